"""A1111 `<lora:...>` prompt tags and `FILE:weight` arguments: parsing, stripping and errors."""

import pytest

from trainer.errors import UserError
from trainer.generate.prompt_syntax import LoraTag, a1111_alias, parse_lora_arg, parse_prompt, strip_lora_tags


def test_single_weight_sets_both():
    text, tags = parse_prompt("<lora:my-style:0.8> zxq style, a castle")
    assert text == "zxq style, a castle"
    assert tags == [LoraTag("my-style", 0.8, 0.8, None, "<lora:my-style:0.8>")]


def test_default_weight_is_one_and_order_is_kept():
    text, tags = parse_prompt("a <lora:a> castle <lora:b:0.5>, night")
    assert text == "a castle , night"
    assert [(t.name, t.te_weight, t.unet_weight) for t in tags] == [("a", 1.0, 1.0), ("b", 0.5, 0.5)]


def test_positional_te_unet_dyn():
    _, [t] = parse_prompt("<lora:x:0.25:0.75:8>")
    assert (t.te_weight, t.unet_weight, t.dyn) == (0.25, 0.75, 8)


def test_named_te_unet():
    _, [t] = parse_prompt("<lora:x:te=0.3:unet=-0.5>")
    assert (t.te_weight, t.unet_weight) == (0.3, -0.5)
    _, [t] = parse_prompt("<lora:x:0.9:unet=0.1>")
    assert (t.te_weight, t.unet_weight) == (0.9, 0.1)


def test_lyco_alias_and_other_networks_left_alone():
    text, tags = parse_prompt("<lyco:loc:0.5> <hypernet:h:1> cat")
    assert [t.name for t in tags] == ["loc"]
    assert text == "<hypernet:h:1> cat"


def test_strip_only():
    assert strip_lora_tags("<lora:a:1>") == ""
    assert strip_lora_tags("no tags here") == "no tags here"


@pytest.mark.parametrize("bad", ["<lora:x:abc>", "<lora:x:te=q>", "<lora:x:1:2:z>", "<lora:x:1:foo=2>",
                                 "<lora:x:nan>", "<lora: :1>", "<lora:x:1:2:3:4>"])
def test_bad_tags_are_one_line_errors(bad):
    with pytest.raises(UserError) as e:
        parse_prompt(f"a {bad} b")
    assert "\n" not in str(e.value)


def test_tag_round_trip():
    for tag in ["<lora:a:0.8>", "<lora:a:0.5:1>", "<lora:a:1:1:4>"]:
        _, [t] = parse_prompt(tag)
        assert t.to_tag() == tag


def test_lora_arg_forms(tmp_path):
    assert parse_lora_arg("style") == LoraTag("style", text="style")
    t = parse_lora_arg("dir/x.safetensors:0.8")
    assert (t.name, t.te_weight, t.unet_weight) == ("dir/x.safetensors", 0.8, 0.8)
    t = parse_lora_arg("x.safetensors:0.5:1")
    assert (t.te_weight, t.unet_weight) == (0.5, 1.0)
    t = parse_lora_arg("name:unet=0.2")
    assert (t.name, t.te_weight, t.unet_weight) == ("name", 1.0, 0.2)
    odd = tmp_path / "we:ird.bin"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)).name == str(odd)
    t = parse_lora_arg(f"{odd}:0.3")
    assert (t.name, t.weight) == (str(odd), 0.3)


def test_lora_arg_weight_not_a_number():
    with pytest.raises(UserError, match="'abc' in --lora file.safetensors:abc is not a number"):
        parse_lora_arg("file.safetensors:abc")


def test_alias():
    assert a1111_alias("a:b,c") == "abc"


# ------------------------------------------------------------------------------------ A1111 attention syntax

def test_attention_weights_nest_and_multiply():
    from trainer.generate.prompt_syntax import parse_attention
    assert parse_attention("a cat") == [("a cat", 1.0)]
    assert parse_attention("a (cat) [dog]") == [("a ", 1.0), ("cat", pytest.approx(1.1)), (" ", 1.0),
                                                ("dog", pytest.approx(1 / 1.1))]
    assert parse_attention("((cat))") == [("cat", pytest.approx(1.21))]
    assert parse_attention("(a (b:2) c:0.5)") == [("a ", pytest.approx(0.5)), ("b", pytest.approx(1.0)),
                                                  (" c", pytest.approx(0.5))]
    assert parse_attention("(cat:1.5), dog") == [("cat", 1.5), (", dog", 1.0)]
    assert parse_attention("(open") == [("open", pytest.approx(1.1))]  # an open bracket runs to the end


def test_escapes_stray_brackets_and_colons_are_text():
    from trainer.generate.prompt_syntax import parse_attention
    assert parse_attention(r"\(name\) \[x\] a\\b") == [(r"(name) [x] a\b", 1.0)]
    assert parse_attention("x) y] a: b") == [("x) y] a: b", 1.0)]
    assert parse_attention("(a:big)") == [("a:big", pytest.approx(1.1))]  # not a number: text, bracket x1.1


def test_break_is_its_own_run_and_only_as_a_word():
    from trainer.generate.prompt_syntax import parse_attention
    assert parse_attention("a castle BREAK (night:1.2)") == [("a castle", 1.0), ("BREAK", -1.0), ("night", 1.2)]
    assert parse_attention("BREAKfast, break") == [("BREAKfast, break", 1.0)]


# ------------------------------------------------------------------------------------ kohya sample options

def test_sample_prompt_options():
    from trainer.generate.prompt_syntax import SamplePrompt, parse_sample_prompts
    got = parse_sample_prompts(["a castle, (night:1.2) --n blurry, low quality --w 768 --h 512 --s 28 --l 6.5 "
                                "--d 42 --ss Euler a", "plain prompt", "x --ss dpmpp_2m_karras --n "])
    assert got == [SamplePrompt("a castle, (night:1.2)", "blurry, low quality", 768, 512, 28, 6.5, 42, "euler_a"),
                   SamplePrompt("plain prompt"), SamplePrompt("x", negative="", sampler="dpmpp_2m_karras")]


@pytest.mark.parametrize("line, says", [
    ("a cat --w 13", "--w 13 is not a multiple of 8"),
    ("a cat --s many", "--s 'many' is not a whole number"),
    ("a cat --ss turbo", "--ss 'turbo' is not a sampler"),
    ("a cat --q 1", "unknown option --q"),
    ("a cat --l", "--l needs a value"),
    ("a cat --h 99999", "--h 99999 is above the maximum"),
])
def test_a_bad_sample_option_names_the_line_and_the_option(line, says):
    from trainer.generate.prompt_syntax import parse_sample_prompts
    with pytest.raises(UserError) as e:
        parse_sample_prompts(["fine --w 512", line])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"sample.prompts line 2 ({line!r})") and says in msg
