"""`lorastudio prepare`, `scan` and `captions`: check, caption and edit a dataset folder from a shell."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from app.cli.flags import add_field_flag
from datasets_tools.captioners import (CAPTIONERS, DEFAULT_FLORENCE_TASK, DEFAULT_INSTRUCTION, DEFAULT_MAX_WORDS,
                                       DEVICE_CHOICES, DTYPE_CHOICES, FLORENCE_TASKS, REGISTRY, captioner_name,
                                       florence_task)
from trainer.config import FIELDS


def _add_scan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="dataset folder (searched recursively; 'N_name' sub-folders repeat N times)")
    g = p.add_argument_group("buckets (the data.* config keys: same type, default and range)")
    for key in ("data.resolution", "data.min_bucket_px", "data.max_bucket_px", "data.bucket_step_px"):
        add_field_flag(g, FIELDS[key])
    add_field_flag(g, FIELDS["data.bucket_no_upscale"], "--no-upscale")
    add_field_flag(g, FIELDS["train.batch_size"], note="warns about buckets with fewer samples")
    add_field_flag(p, FIELDS["data.caption_extension"])
    add_field_flag(p, FIELDS["data.mask_dir"], note="reports missing, wrong-size and empty masks")
    p.add_argument("--report", metavar="JSON", help="write the full report (every image, problem and crop) here")
    p.add_argument("--contact-sheet", metavar="PNG", help="draw every image with its bucket and crop box here")
    p.add_argument("--no-near-duplicates", action="store_true",
                   help="skip perceptual-hash duplicate search (it decodes thumbnails; the rest reads headers)")
    p.add_argument("--full-decode", action="store_true", help="decode every image to find all truncated files")


def _takes(option: str) -> str:
    """'blip, florence2, vlm': the captioners that take an option, from the registry."""
    return ", ".join(n for n in CAPTIONERS if option in REGISTRY[n].options)


def register(sub) -> None:
    p = sub.add_parser("prepare", help="scan a dataset folder, caption it, and report buckets and problems",
                       description="Scan DIR (nothing is moved or deleted), optionally caption images that have "
                                   "no caption, and report problems, buckets and crops.")
    _add_scan_args(p)
    c = p.add_argument_group("captioning")
    c.add_argument("--captioner", choices=CAPTIONERS, type=captioner_name,  # aliases ('joycaption') welcome
                   help="caption images without a caption file (all of them with --overwrite); "
                        + "; ".join(f"{c.name}: {c.help}" for c in REGISTRY.values()).replace("%", "%%"))
    c.add_argument("--model", help="captioner model: a local folder/file or a hub id (every captioner but template; "
                                   "a local folder loads offline)")
    c.add_argument("--trigger", help="trigger word put first in every new caption")
    c.add_argument("--overwrite", action="store_true", help="replace existing captions (they are backed up; "
                                                            "`lorastudio captions DIR --undo` reverts)")
    c.add_argument("--restart", action="store_true",
                   help="with --overwrite: start over instead of continuing an interrupted run of the same command")
    c.add_argument("--caption-batch-size", type=int, default=8,
                   help="images per captioner batch (--batch-size is the training batch the scan checks)")
    c.add_argument("--device", default=DEVICE_CHOICES[0], choices=DEVICE_CHOICES, help="captioner device")
    c.add_argument("--dtype", default=DTYPE_CHOICES[0], choices=DTYPE_CHOICES,
                   help=f"{_takes('dtype')}: captioner precision; auto: float32 on CPU, bfloat16 or float16 on "
                        "a GPU")
    c.add_argument("--template", default="{name}", help="template captioner: {trigger}, {name}, {folder}")
    c.add_argument("--general-threshold", type=float, default=0.35, help="wd14: general tag threshold")
    c.add_argument("--character-threshold", type=float, default=0.85, help="wd14: character tag threshold")
    c.add_argument("--blacklist", default="", help="wd14: comma-separated tags never written")
    c.add_argument("--keep-underscores", action="store_true", help="wd14: keep booru underscores in tags")
    c.add_argument("--prompt", "--instruction", dest="prompt",
                   help=f"{_takes('prompt')}: the instruction a chat VLM is asked about each picture (default: "
                        f"\"{DEFAULT_INSTRUCTION}\"), or the text an image-to-text model continues".replace("%", "%%"))
    c.add_argument("--task", type=florence_task, default=DEFAULT_FLORENCE_TASK, choices=FLORENCE_TASKS,
                   help=f"{_takes('task')}: the caption task prompt (also without brackets: "
                        f"{', '.join(t.strip('<>').lower() for t in FLORENCE_TASKS)})")
    c.add_argument("--max-new-tokens", type=int,
                   help=f"{_takes('max_new_tokens')}: longest answer in tokens (default: the captioner's own)")
    c.add_argument("--num-beams", type=int, help=f"{_takes('num_beams')}: beam-search width (default: the "
                                                 f"captioner's own); decoding is deterministic (no sampling)")
    c.add_argument("--max-words", type=int, default=DEFAULT_MAX_WORDS,
                   help=f"{_takes('max_words')}: longest caption kept, in words (cut at a sentence end); 0: no cap")
    p.set_defaults(func=_prepare)

    s = sub.add_parser("scan", help="scan a dataset folder and report buckets and problems (read-only)")
    _add_scan_args(s)
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of the summary")
    s.set_defaults(func=_scan)

    e = sub.add_parser("captions", help="edit captions (prefix, replace, remove, dedupe), tag stats, undo",
                       description="Edit every caption under DIR. Each run is backed up in "
                                   "DIR/.lorastudio_backup and reverted by --undo (one run per --undo).")
    e.add_argument("dir")
    e.add_argument("--add-prefix", metavar="TRIGGER", help="put TRIGGER first in every caption (no duplicates); "
                   "images without a caption get one")
    e.add_argument("--replace", metavar="'FIND=>REPL'", action="append", default=[],
                   help="replace whole words/tags (repeatable); an empty REPL deletes")
    e.add_argument("--remove-tags", metavar="TAG", action="extend", nargs="+", default=[],
                   help="tags to remove, space- or comma-separated (underscores and spaces match each other)")
    e.add_argument("--dedupe", action="store_true", help="drop repeated tags within each caption")
    e.add_argument("--stats", action="store_true", help="print the tag frequency table")
    e.add_argument("--stats-json", metavar="JSON", help="write {folder: {tag: count}} (kohya ss_tag_frequency)")
    e.add_argument("--undo", action="store_true", help="restore the captions saved by the last edit")
    e.add_argument("--dry-run", action="store_true", help="show what would change, write nothing")
    add_field_flag(e, FIELDS["data.caption_extension"])
    e.set_defaults(func=_captions)


def _scan_kwargs(args) -> dict:
    return dict(resolution=args.resolution, min_px=args.min_bucket_px, max_px=args.max_bucket_px,
                step=args.bucket_step_px, no_upscale=args.no_upscale, batch_size=args.batch_size,
                caption_extension=args.caption_extension, near_duplicates=not args.no_near_duplicates,
                full_decode=args.full_decode, mask_dir=args.mask_dir or None)


def _check_output(path: str | None, what: str) -> None:
    from datasets_tools.errors import DatasetError

    if path and not Path(path).expanduser().resolve().parent.is_dir():
        raise DatasetError(f"folder for the {what} does not exist: {Path(path).parent}", path=path)


def _finish_scan(args, report) -> None:
    if args.report:
        report.write_json(Path(args.report).expanduser())
        print(f"report: {args.report}")
    if args.contact_sheet:
        from datasets_tools.preview import contact_sheet

        contact_sheet(report, Path(args.contact_sheet).expanduser())
        print(f"contact sheet: {args.contact_sheet}")


def _scan(args) -> int:
    from datasets_tools.folder import check_folder
    from datasets_tools.scan import scan_folder

    check_folder(args.dir)
    _check_output(args.report, "report")
    _check_output(args.contact_sheet, "contact sheet")
    report = scan_folder(args.dir, **_scan_kwargs(args))
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1, ensure_ascii=False)
        print()
    else:
        print(report.summary())
    _finish_scan(args, report)
    return 0


def _prepare(args) -> int:
    from datasets_tools.folder import check_folder
    from datasets_tools.scan import scan_folder

    root = check_folder(args.dir)
    _check_output(args.report, "report")
    _check_output(args.contact_sheet, "contact sheet")
    if args.captioner:
        _caption(args, root)
    report = scan_folder(root, **_scan_kwargs(args))
    print(report.summary())
    _finish_scan(args, report)
    return 0


def _caption(args, root: Path) -> None:
    from datasets_tools.captioners import (caption_folder, caption_todo, captioner_options, check_captioner_args,
                                           get_captioner)
    from datasets_tools.captions import ensure_writable
    from datasets_tools.scan import describe_skipped, unusable_files

    check_captioner_args(args.captioner, args.model)
    # The scan's own verdict, asked once: unusable files (truncated, empty, not an image) get no caption.
    unusable = unusable_files(root, caption_extension=args.caption_extension)
    todo, planned = caption_todo(root, overwrite=args.overwrite, caption_extension=args.caption_extension,
                                 unusable=unusable)
    if not todo:
        print("every usable image already has a caption (use --overwrite to replace them)"
              + (f"; {describe_skipped(planned.skipped)}" if planned.skipped else ""))
        return
    # A read-only folder must fail now, not after minutes of model loading and captioning.
    ensure_writable({c.parent for _, c in todo} | {root})
    # Every option goes in; the registry says which ones this captioner takes (no list of names here).
    opts = captioner_options(
        args.captioner, template=args.template, trigger=args.trigger, root=root, device=args.device,
        dtype=args.dtype, general_threshold=args.general_threshold, character_threshold=args.character_threshold,
        blacklist=[t for t in args.blacklist.split(",") if t.strip()], underscores_to_spaces=not args.keep_underscores,
        prompt=args.prompt, task=args.task, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
        max_words=args.max_words)
    model = args.model if REGISTRY[args.captioner].needs_model else None
    cap = get_captioner(args.captioner, model=model, **opts)
    print(f"captioning {len(todo)} image(s) with {cap.describe()}", file=sys.stderr)
    try:
        run = caption_folder(root, cap, trigger=args.trigger, overwrite=args.overwrite,
                             batch_size=args.caption_batch_size, caption_extension=args.caption_extension,
                             unusable=unusable, resume=not args.restart)
    except KeyboardInterrupt:
        print("interrupted: the captions finished so far are written; run the same command again to continue",
              file=sys.stderr)
        raise
    for problem in run.not_captioned:
        print(f"warning: {problem.message}", file=sys.stderr)
    print(run.summary())


def _captions(args) -> int:
    from datasets_tools import captions as C
    from datasets_tools.errors import DatasetError
    from datasets_tools.folder import check_folder

    root = check_folder(args.dir)
    edits = bool(args.add_prefix or args.replace or args.remove_tags or args.dedupe)
    if args.undo and edits:
        raise DatasetError("--undo cannot be combined with edits; run it on its own")
    if not (edits or args.undo or args.stats or args.stats_json):
        raise DatasetError("nothing to do: give --add-prefix, --replace, --remove-tags, --dedupe, --stats or --undo")
    if args.undo:
        if args.dry_run:
            raise DatasetError("--undo has no dry run; list the backups in "
                               f"{root / C.BACKUP_DIR} to see what it would restore")
        print(C.undo(root).summary())
    elif edits:
        # One transform chain, one backup: a single --undo reverts the whole command. The prefix goes last so
        # a replacement cannot push the trigger out of first place.
        transforms, names = [], []
        for spec in args.replace:
            find, repl = C.parse_replacement(spec)
            transforms.append(C.replace_transform(find, repl))
            names.append(f"replace '{find}' => '{repl}'")
        tags = [t for spec in args.remove_tags for t in spec.split(",") if t.strip()]
        if args.remove_tags:
            transforms.append(C.remove_tags_transform(tags))
            names.append(f"remove tags {', '.join(tags)}")
        if args.dedupe:
            transforms.append(C.dedupe_transform())
            names.append("dedupe tags")
        if args.add_prefix:
            transforms.append(C.prefix_transform(args.add_prefix))
            names.append(f"add prefix '{args.add_prefix}'")
        result = C.edit_captions(root, transforms, operation="; ".join(names),
                                 caption_extension=args.caption_extension, create_missing=bool(args.add_prefix),
                                 dry_run=args.dry_run)
        print(result.summary())
        if args.dry_run:
            for rel in result.changed[:20]:
                print(f"  would change {rel}")
    if args.stats or args.stats_json:
        freq = C.tag_frequency(root, caption_extension=args.caption_extension)
        if args.stats:
            print(C.format_frequency(freq))
        if args.stats_json:
            _check_output(args.stats_json, "tag statistics")
            C.atomic_write_text(Path(args.stats_json).expanduser(), json.dumps(freq, indent=1, ensure_ascii=False))
            print(f"tag frequencies: {args.stats_json}")
    return 0
