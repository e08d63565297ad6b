"""The caption editor of the Dataset tab: a page of pictures, each with its caption editable in place.

The grid is built once with ``SLOTS`` cells (a thumbnail from the tab's thumbnail cache, a check box named after
the file, the caption box); a page shows ``PAGE_SIZES`` of them, so a 200-picture folder never sends 200 pictures.
Above it: a filter (tags and/or text), paging, and a bulk edit that adds or removes a tag on the selection (the
checked pictures, or every filtered picture when none is checked). Tag boxes complete from the folder's own tag
frequencies (``datasets_tools.captions.tag_frequency``).

Every write goes through ``datasets_tools.captions`` (one backup per edit, so **Undo last edit** steps back), and
then the tab's scan is re-run so the report follows the captions. Typed captions are never dropped: saving, paging,
filtering and bulk edits first save what was changed on the page (one undoable edit); only Undo discards them.

Keys (a small script the page loads with the grid): Alt+Right / Alt+Left go to the next / previous picture's
caption (over page ends), Ctrl+Enter (or gradio's Shift+Enter) saves, Alt+PageDown / Alt+PageUp turn the page.
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from trainer.errors import UserError

from app.ui.form import guarded
from app.ui.registry import Registry
from app.ui.state import AppState

#: Pictures per page the user can choose; the grid has a cell for the largest (the one source of these limits).
PAGE_SIZES = (6, 12, 24)
SLOTS = PAGE_SIZES[-1]
DEFAULT_PAGE_SIZE = PAGE_SIZES[1]
COLUMNS = 6            # cells per row
THUMB_PX = 192         # the thumbnail cache's size (longest side)
CELL_PX = 150          # thumbnail height in the grid
TAG_CHOICES = 500      # the most frequent tags offered by the tag boxes


def thumbnail(state: AppState, path: Path) -> str:
    """A cached small copy of a dataset picture (the browser never gets the original file)."""
    from datasets_tools.images import load_rgb
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode()).hexdigest()[:24]
    out = state.work / "thumbs" / f"{key}.jpg"
    if not out.exists():
        img = load_rgb(path, draft_px=THUMB_PX)
        img.thumbnail((THUMB_PX, THUMB_PX))
        tmp = out.with_suffix(".tmp.jpg")
        img.save(tmp, quality=88)
        tmp.replace(out)
    return str(out)


def filter_items(items: list[dict], tag_filter: str | None, text_filter: str | None) -> list[dict]:
    """The pictures whose caption has every tag of ``tag_filter`` (comma-separated) and contains the text."""
    from datasets_tools.captions import caption_matches, split_tags
    tags = split_tags(tag_filter or "")
    text = (text_filter or "").strip()
    if not tags and not text:
        return list(items)
    return [it for it in items if caption_matches(it["caption"], tags=tags, text=text, name=it["rel"])]


def page_size(value) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return DEFAULT_PAGE_SIZE
    return n if n in PAGE_SIZES else DEFAULT_PAGE_SIZE


def tidy(text: str | None) -> str:
    """A caption as it is saved: one line, single spaces."""
    return " ".join(str(text or "").split())


def items_root(items: list[dict]) -> Path | None:
    """The scanned folder the items come from (each item's image path ends with its path relative to it)."""
    if not items:
        return None
    image, rel = items[0]["image"], items[0]["rel"]
    return Path(image[:-len(rel)]) if image.endswith(rel) else None


def tag_choices(root: Path, ext: str) -> list[tuple[str, str]]:
    """("tag (n)", tag) for the folder's most frequent tags: what the tag boxes complete from."""
    from datasets_tools.captions import tag_frequency, total_frequency
    return [(f"{t} ({n})", t) for t, n in total_frequency(tag_frequency(root, caption_extension=ext))[:TAG_CHOICES]]


KEYS_JS = """
if (!window.__lsCaptionKeys) {
  window.__lsCaptionKeys = true;
  const cells = () => Array.from(document.querySelectorAll('#ce-grid .ce-cell')).filter(c => c.offsetParent !== null);
  const pos = () => document.querySelector('#ce-pos');
  const focusCell = (c) => {
    const t = c && c.querySelector('textarea');
    if (!t) return;
    t.focus();
    t.setSelectionRange(t.value.length, t.value.length);
    c.scrollIntoView({block: 'nearest'});
  };
  // press a paging button, then put the caret in the first (or last) caption of the page it shows
  const turn = (delta, where) => {
    const p = pos();
    if (!p) return;
    const page = +p.dataset.page, pages = +p.dataset.pages;
    if (page + delta < 1 || page + delta > pages) return;
    const before = p.dataset.key;
    document.querySelector(delta > 0 ? '#ce-next' : '#ce-prev').click();
    let n = 0;
    const wait = setInterval(() => {
      const q = pos();
      if (q && q.dataset.key !== before) {
        clearInterval(wait);
        requestAnimationFrame(() => requestAnimationFrame(() => {
          const cs = cells();
          focusCell(where === 'last' ? cs[cs.length - 1] : cs[0]);
        }));
      } else if (++n > 6000) clearInterval(wait);
    }, 50);
  };
  document.addEventListener('keydown', (e) => {
    const editor = document.querySelector('#ce-editor');
    if (!editor || !editor.contains(document.activeElement)) return;
    const here = document.activeElement.closest('.ce-cell');
    const act = (fn) => { e.preventDefault(); e.stopPropagation(); fn(); };
    if (e.altKey && !e.ctrlKey && (e.key === 'ArrowRight' || e.key === 'ArrowLeft')) {
      const step = e.key === 'ArrowRight' ? 1 : -1;
      act(() => {
        const cs = cells();
        const i = here ? cs.indexOf(here) : -1;
        if (i < 0) focusCell(cs[0]);
        else if (cs[i + step]) focusCell(cs[i + step]);
        else turn(step, step > 0 ? 'first' : 'last');
      });
    } else if (e.altKey && (e.key === 'PageDown' || e.key === 'PageUp')) {
      act(() => turn(e.key === 'PageDown' ? 1 : -1, 'first'));
    } else if (e.ctrlKey && e.key === 'Enter' && here) {
      act(() => document.querySelector('#ce-save').click());
    }
  }, true);
}
"""

STYLE = f"""<style>
#ce-grid .ce-cell {{ border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 4px; gap: 2px; }}
#ce-grid .ce-cell:focus-within {{ outline: 3px solid #f97316; }}
#ce-grid .ce-cell img {{ image-rendering: pixelated; object-fit: contain; max-height: {CELL_PX}px; }}
#ce-grid .ce-cell label span {{ font-size: 0.85em; word-break: break-all; }}
</style>"""


@dataclass
class CaptionEditor:
    """The editor's controls; ``wire`` connects them once the Train form (its bucket settings) exists."""
    state: AppState
    status: Any
    page_info: Any
    sel_info: Any
    filter_tag: Any
    filter_text: Any
    size: Any
    bulk_tag: Any
    buttons: dict
    view: Any        # gr.State: {"page": 0-based, "size", "tag", "text": what is shown, "checked": [image, ...]}
    shown: Any       # gr.State: the pictures (image paths) the cells show, in order
    cells: list
    images: list
    checks: list
    caps: list

    # ------------------------------------------------------------------------------------------ rendering
    def render_outputs(self) -> list:
        return [self.page_info, self.sel_info, self.view, self.shown, self.filter_tag, self.filter_text,
                self.bulk_tag, *self.cells, *self.images, *self.checks, *self.caps]

    def render(self, items: list[dict], view: dict, shown_before: list[str], typed: list[str], tag_f, text_f, size,
               choices: list | None, *, unfilter: bool = False) -> list:
        """The updates that show ``view``'s page; cells that keep their picture and text are left alone.

        choices: new tag choices for the tag boxes (None keeps theirs); unfilter: empty the filter boxes too."""
        if unfilter:
            tag_f = text_f = ""
        size = page_size(size)
        by_img = {it["image"]: it for it in items}
        checked = [r for r in view.get("checked", []) if r in by_img]
        filtered = filter_items(items, tag_f, text_f)
        pages = max(1, math.ceil(len(filtered) / size))
        page = min(max(int(view.get("page", 0)), 0), pages - 1)
        shown = [it["image"] for it in filtered[page * size:(page + 1) * size]]
        view = {"page": page, "size": size, "tag": tag_f, "text": text_f, "checked": checked}
        cells, images, checks, caps = [], [], [], []
        for i in range(SLOTS):
            if i >= len(shown):
                cells.append(gr.update(visible=False))
                images.append(gr.skip())
                checks.append(gr.skip())
                caps.append(gr.skip())
                continue
            it = by_img[shown[i]]
            same = i < len(shown_before) and shown_before[i] == shown[i]
            cells.append(gr.skip() if same else gr.update(visible=True))
            if same:
                images.append(gr.skip())
            else:
                try:
                    images.append(thumbnail(self.state, Path(it["image"])))
                except Exception:  # noqa: BLE001 - a broken picture: the scan report names it
                    images.append(None)
            note = "" if Path(it["caption_file"]).exists() else " (no caption)"
            checks.append(gr.update(label=it["rel"] + note, value=it["image"] in checked))
            old = typed[i] if same and i < len(typed) else None
            caps.append(gr.skip() if old is not None and tidy(old) == tidy(it["caption"]) else it["caption"])
        first, last = page * size + 1, page * size + len(shown)
        where = (f"pictures {first}-{last} of {len(filtered)}" if shown else "no picture matches the filter"
                 if items else "scan a folder to see its pictures here")
        if len(filtered) != len(items):
            where += f" (filtered from {len(items)})"
        key = hashlib.sha1("|".join([*shown, str(page)]).encode()).hexdigest()[:16]
        info = (f"<div id='ce-pos' data-page='{page + 1}' data-pages='{pages}' data-key='{key}'>"
                f"<b>Page {page + 1} of {pages}</b> · {html.escape(where)}</div>")
        tag_update = gr.skip() if choices is None else gr.update(choices=choices)
        filter_update = gr.update(value=None, **({} if choices is None else {"choices": choices}))
        return [info, self.selection_text(items, checked, filtered), view, shown,
                filter_update if unfilter else tag_update, "" if unfilter else gr.skip(), tag_update,
                *cells, *images, *checks, *caps]

    @staticmethod
    def selection_text(items: list[dict], checked: list[str], filtered: list[dict]) -> str:
        if checked:
            return f"Bulk edits apply to the **{len(checked)} checked** picture(s)."
        if not items:
            return ""
        which = "filtered " if len(filtered) != len(items) else ""
        return f"Bulk edits apply to **all {len(filtered)} {which}picture(s)** (none checked)."

    # ------------------------------------------------------------------------------------------ wiring
    def wire(self, *, folder, items, bucket_inputs: list, root_of: Callable[[str], Path],
             settings: Callable[..., dict], rescan: Callable[[Path, dict], tuple], rescan_outputs: list,
             words: Callable[[str], str]) -> None:
        from datasets_tools import captions as CAP

        inputs = [folder, items, self.view, self.shown, self.filter_tag, self.filter_text, self.size,
                  self.bulk_tag, *self.checks, *self.caps, *bucket_inputs]
        outputs = [self.status, *rescan_outputs, *self.render_outputs()]
        n_out = len(outputs)

        def handler(kind: str):
            @guarded(n_out)
            def run(folder_now, items_now, view, shown, tag_f, text_f, size, bulk_tag, *rest):
                checks, typed, bucket = rest[:SLOTS], list(rest[SLOTS:2 * SLOTS]), rest[2 * SLOTS:]
                items_now, view, shown = items_now or [], dict(view or {}), list(shown or [])
                if kind == "reload" and not items_now:
                    return (gr.skip(), *[gr.skip()] * len(rescan_outputs),
                            *self.render(items_now, view, [], [], tag_f, text_f, size, None))
                # the folder the grid shows is the one written to (not a path typed since the scan)
                root = items_root(items_now) or root_of(folder_now)
                s = settings(*bucket)
                ext = s["data.caption_extension"]
                tags = CAP.split_tags(bulk_tag or "")
                if kind in ("add", "remove") and not tags:
                    raise UserError("type or pick the tag to add or remove (Tag box)")
                # the check boxes of this page as they are now, merged into the selection of every page
                checked = [r for r in view.get("checked", []) if r not in shown]
                checked += [r for r, c in zip(shown, checks) if c]
                if kind == "check_page":
                    checked += [r for r in shown if r not in checked]
                elif kind == "clear":
                    checked = []
                view["checked"] = sorted(set(checked))
                said, wrote = [], False
                if kind not in ("reload", "undo"):  # typed captions are saved before anything else
                    saved = self.save_page(CAP, root, items_now, shown, typed)
                    if saved:
                        said.append(words(saved))
                        wrote = True
                if kind in ("add", "remove"):
                    if wrote:
                        items_now = rescan(root, s)[-1]
                    by_img = {it["image"]: it for it in items_now}
                    sel = ([by_img[i]["rel"] for i in view["checked"] if i in by_img] if view["checked"] else
                           [it["rel"] for it in filter_items(items_now, tag_f, text_f)])
                    if sel:
                        edit = CAP.add_tags if kind == "add" else CAP.remove_tags
                        said.append(words(edit(root, tags, only=sel, caption_extension=ext).summary()))
                        wrote = True
                    else:
                        said.append("no picture is selected: check some, or change the filter")
                elif kind == "undo":
                    by_img = {it["image"]: it for it in items_now}
                    dropped = any(i in by_img and t is not None and tidy(t) != tidy(by_img[i]["caption"])
                                  for i, t in zip(shown, typed))
                    said.append(words(CAP.undo(root).summary())
                                + (" (unsaved typing on the page was dropped)" if dropped else ""))
                    wrote = True
                elif kind in ("prev", "next", "size", "filter", "all"):
                    page = int(view.get("page", 0))
                    if kind == "size":  # keep the first picture of the page in view
                        page = (page * page_size(view.get("size") or size)) // page_size(size)
                    view["page"] = {"prev": page - 1, "next": page + 1, "filter": 0, "all": 0}.get(kind, page)
                view["size"] = page_size(size)
                if kind == "save" and not said:
                    said.append("no caption was changed on this page")
                if wrote:
                    out = rescan(root, s)
                    items_now = out[-1]
                    rescanned = list(out)
                else:
                    rescanned = [gr.skip()] * len(rescan_outputs)
                choices = tag_choices(root, ext) if wrote or kind == "reload" else None
                status = "; ".join(said) if said else gr.skip()
                # after an undo the cells show the files, whatever was typed into them
                return (status, *rescanned,
                        *self.render(items_now, view, shown, [] if kind == "undo" else typed, tag_f, text_f, size,
                                     choices, unfilter=kind == "all"))
            run.__name__ = f"caption_editor_{kind}"
            return run

        b = self.buttons
        # a quick second save is queued, not dropped, and the editor's events run one at a time (a save and a page
        # turn never write the same files at once)
        many = dict(trigger_mode="multiple", show_progress="minimal", concurrency_id="caption-editor")
        for kind in ("save", "prev", "next", "add", "remove", "undo", "check_page", "clear", "all"):
            b[kind].click(handler(kind), inputs, outputs, **many)
        gr.on([cap.submit for cap in self.caps], handler("save"), inputs, outputs,  # Shift+Enter, gradio's own
              **many)
        self.filter_tag.input(handler("filter"), inputs, outputs, **many)
        self.filter_text.submit(handler("filter"), inputs, outputs, **many)
        self.size.input(handler("size"), inputs, outputs, **many)
        self._reload = (handler("reload"), inputs, outputs, "caption-editor")

        def on_check(items_now, view, shown, *checks):
            view, shown = dict(view or {}), list(shown or [])
            checked = [r for r in view.get("checked", []) if r not in shown]
            view["checked"] = sorted(checked + [r for r, c in zip(shown, checks) if c])
            return view, self.selection_text(items_now or [], view["checked"],
                                             filter_items(items_now or [], view.get("tag"), view.get("text")))
        gr.on([chk.input for chk in self.checks], on_check, [items, self.view, self.shown, *self.checks],
              [self.view, self.sel_info], show_progress="hidden", trigger_mode="always_last",
              concurrency_id="caption-editor")  # never interleaved with a page turn that rewrites the view

    def reload(self, event) -> None:
        """Show the folder's captions again after ``event`` (a scan, captioning, an operation) changed them."""
        fn, inputs, outputs, group = self._reload
        event.then(fn, inputs, outputs, show_progress="hidden", concurrency_id=group)

    @staticmethod
    def save_page(CAP, root: Path, items: list[dict], shown: list[str], typed: list[str]) -> str:
        """Write the captions typed on the page that differ from the files, as one undoable edit."""
        by_img = {it["image"]: it for it in items}
        texts, names = {}, []
        for img, text in zip(shown, typed):
            it = by_img.get(img)
            if it is None or text is None or tidy(text) == tidy(it["caption"]):
                continue
            texts[Path(it["caption_file"])] = tidy(text)
            names.append(it["rel"])
        if not texts:
            return ""
        what = f"the caption of {names[0]}" if len(names) == 1 else f"{len(names)} captions"
        res = CAP.apply_caption_texts(root, texts, operation=f"edit {what}")
        return f"saved {what} ({res.summary()})" if res.changed else ""


def create_caption_editor(state: AppState, reg: Registry) -> CaptionEditor:
    """The editor's layout (inside the Dataset tab); its handlers come with ``CaptionEditor.wire``."""
    r = reg.add
    with gr.Column(elem_id="ce-editor"):
        gr.HTML(STYLE + "<p style='margin:0'>Click a caption and type. <b>Alt+&rarr;</b> / <b>Alt+&larr;</b> next / "
                "previous picture, <b>Ctrl+Enter</b> save, <b>Alt+PageDown</b> / <b>Alt+PageUp</b> next / previous "
                "page. Paging, filtering and bulk edits save what you typed first; every save is one step of "
                "<b>Undo last edit</b>.</p>", js_on_load=KEYS_JS, elem_id="ce-keys")
        with gr.Row(equal_height=True):
            filter_tag = r("dataset.editor_filter_tag", gr.Dropdown(
                value=None, allow_custom_value=True, label="Filter: has tag(s)", scale=2,
                elem_id="ce-filter-tag", info="comma-separated; completes from this folder's tags"))
            filter_text = r("dataset.editor_filter_text", gr.Textbox(
                label="Filter: text", scale=2, elem_id="ce-filter-text",
                info="part of a caption or file name; Enter applies"))
            all_btn = gr.Button("Show all", size="md", scale=0, elem_id="ce-show-all")
            size = r("dataset.editor_page_size", gr.Dropdown(
                choices=list(PAGE_SIZES), value=DEFAULT_PAGE_SIZE, label="Pictures per page", scale=1,
                elem_id="ce-page-size"))
        with gr.Row(equal_height=True):
            prev_btn = gr.Button("< Previous page", size="md", scale=0, elem_id="ce-prev")
            page_info = r("dataset.editor_page", gr.HTML("", elem_id="ce-page-info", js_on_load=None))
            next_btn = gr.Button("Next page >", size="md", scale=0, elem_id="ce-next")
            save_btn = r("dataset.editor_save", gr.Button("Save captions (Ctrl+Enter)", variant="primary",
                                                           size="md", scale=0, elem_id="ce-save"))
        with gr.Row(equal_height=True):
            bulk_tag = r("dataset.editor_tag", gr.Dropdown(
                value=None, allow_custom_value=True, label="Tag", scale=2, elem_id="ce-tag",
                info="completes from this folder's tags"))
            add_btn = gr.Button("Add tag to selection", size="md", scale=0, elem_id="ce-add")
            remove_btn = gr.Button("Remove tag from selection", size="md", scale=0, elem_id="ce-remove")
            check_btn = gr.Button("Check this page", size="md", scale=0, elem_id="ce-check-page")
            clear_btn = gr.Button("Clear checks", size="md", scale=0, elem_id="ce-clear")
            undo_btn = r("dataset.editor_undo", gr.Button("Undo last edit", size="md", scale=0, elem_id="ce-undo"))
        sel_info = r("dataset.editor_selection", gr.Markdown("", elem_id="ce-selection"))
        status = r("dataset.editor_status", gr.Markdown("", elem_id="ce-status"))
        cells, images, checks, caps = [], [], [], []
        with gr.Column(elem_id="ce-grid"):
            for row in range(math.ceil(SLOTS / COLUMNS)):
                with gr.Row(equal_height=False):
                    for i in range(row * COLUMNS, min(SLOTS, (row + 1) * COLUMNS)):
                        with gr.Column(visible=False, min_width=160, elem_id=f"ce-cell-{i}",
                                       elem_classes="ce-cell") as cell:
                            images.append(gr.Image(type="filepath", interactive=False, show_label=False,
                                                   container=False, height=CELL_PX, buttons=[],
                                                   elem_id=f"ce-img-{i}"))
                            checks.append(gr.Checkbox(label="", container=False, elem_id=f"ce-pick-{i}"))
                            caps.append(gr.Textbox(show_label=False, container=False, lines=3, max_lines=6,
                                                   placeholder="(no caption)", elem_id=f"ce-cap-{i}"))
                        cells.append(cell)
    view = r("dataset.editor_view", gr.State({"page": 0, "size": DEFAULT_PAGE_SIZE, "checked": []}))
    shown = r("dataset.editor_shown", gr.State([]))
    for i, (chk, cap) in enumerate(zip(checks, caps)):
        r(f"dataset.editor_check_{i}", chk)
        r(f"dataset.editor_caption_{i}", cap)
    buttons = {"save": save_btn, "prev": prev_btn, "next": next_btn, "add": add_btn, "remove": remove_btn,
               "undo": undo_btn, "check_page": check_btn, "clear": clear_btn, "all": all_btn}
    return CaptionEditor(state, status, page_info, sel_info, filter_tag, filter_text, size, bulk_tag, buttons, view,
                         shown, cells, images, checks, caps)
