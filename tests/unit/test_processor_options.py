"""Processor keywords that vlmkit refuses, or values it cannot take: each is a ProcessorError that names
the keyword and says why; unknown keywords name the closest valid one. No transformers needed."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from vlmkit.errors import ProcessorError
from vlmkit.processor import load_processor
from vlmkit.processor.options import CALL_KEYWORDS, GROUPS, Keyword, add_keywords, resolve_call_options

from ..conftest import published_folder


@pytest.fixture(scope="module")
def proc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_processor(published_folder("SmolVLM-256M-Instruct"))


IMAGE = Image.new("RGB", (40, 30))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"padding_sid": "left"}, r"unknown processor keyword 'padding_sid'; did you mean 'padding_side'\?"),
        ({"do_image_spliting": False}, r"did you mean 'do_image_splitting'\?"),
        ({"images_kwargs": {"do_normalise": False}}, r"'do_normalise' \(in images_kwargs\); did you mean 'do_normalize'"),
        ({"images_kwargs": {"padding": True}}, r"padding is a text keyword but was passed in images_kwargs"),
        ({"text_kwargs": {"do_resize": False}}, r"do_resize is a images keyword but was passed in text_kwargs"),
        ({"padding": True, "text_kwargs": {"padding": False}}, r"padding was passed twice with different values"),
        ({"text_kwargs": "max_length"}, r"text_kwargs must be a dict"),
        ({"padding": "maximal"}, r"padding='maximal' is not valid"),
        ({"truncation": "only_second", "max_length": 4}, r"only_second.*single prompts"),
        ({"max_length": 10}, r"max_length=10 was passed without truncation=True or padding='max_length'"),
        ({"max_length": 0, "truncation": True}, r"max_length=0 is not valid: expected a positive integer"),
        ({"padding_side": "middle"}, r"padding_side='middle' is not valid: expected 'left' or 'right'"),
        ({"return_tensors": "tf"}, r"return_tensors='tf' is not valid"),
        ({"stride": 4}, r"stride=4 is not supported: stride only applies to return_overflowing_tokens"),
        ({"return_overflowing_tokens": True}, r"return_overflowing_tokens=True is not supported"),
        ({"return_special_tokens_mask": "yes"}, r"return_special_tokens_mask='yes' is not valid"),
        ({"text_pair": "b"}, r"text_pair='b' is not supported: the processor takes single prompts"),
        ({"audio": [1.0]}, r"audio=.* is not supported: this processor has no audio input"),
        ({"size": {"height": 10, "width": 10}}, r"size=.* is not valid: expected \{'longest_edge'"),
        ({"size": {"longest_edge": 1024}, "longest_edge": 512}, r"disagree"),
        ({"max_image_size": {"longest_edge": 384}}, r"max_image_size\['longest_edge'\]=384 is not supported: the "
                                                    r"vision tower takes tiles .* \(512\)"),
        ({"image_seq_len": 81}, r"image_seq_len=81 is not supported: .* \(64\)"),
        ({"resample": 9}, r"resample=9 is not valid: expected a PIL.Image.Resampling filter"),
        ({"rescale_factor": -1.0}, r"rescale_factor=-1.0 is not valid"),
        ({"image_std": [0.5, 0.0, 0.5]}, r"image_std=.* is not valid"),
        ({"image_mean": [0.5, 0.5]}, r"image_mean=.* is not valid"),
        ({"do_pad": False}, r"do_pad=False is not supported: the processor always pads"),
        ({"crop_size": {"height": 4}}, r"crop_size=.* is not supported: the tiled image processor never crops"),
        ({"data_format": "channels_last"}, r"data_format='channels_last' is not supported"),
        ({"input_data_format": "channels_last"}, r"input_data_format='channels_last' is not supported"),
        ({"do_normalize": "yes"}, r"do_normalize='yes' is not valid: expected True or False"),
        ({"device": "gpu7"}, r"device='gpu7' is not valid: expected a torch device"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else "",
)
def test_refused_keywords(proc, kwargs, match):
    with pytest.raises(ProcessorError, match=match):
        proc(text="<image>hi", images=IMAGE, **kwargs)


@pytest.mark.parametrize("kwargs", [{"stride": 0}, {"do_pad": True}, {"return_overflowing_tokens": False},
                                    {"data_format": "channels_first"}, {"audio_kwargs": {}}])  # fmt: skip
def test_no_op_values_of_refused_keywords_pass(proc, kwargs):
    base = proc(text="<image>hi", images=IMAGE)
    out = proc(text="<image>hi", images=IMAGE, **kwargs)
    assert out.input_ids.tolist() == base.input_ids.tolist()


def test_truncation_needs_a_length_from_somewhere(proc):
    limit = proc.tokenizer.config["model_max_length"]  # tokenizer_config.json's, when max_length is not given
    assert proc(text="hi" + " hi" * limit).input_ids.shape[1] > limit
    assert proc(text="hi" + " hi" * limit, truncation=True).input_ids.shape[1] == limit
    with pytest.raises(ProcessorError, match="would cut its image tokens"):
        proc(text="<image>hi", images=IMAGE, truncation=True, max_length=64, do_image_splitting=False)


def test_truncated_prompt_fits_max_length(proc):
    out = proc(text=["a b c d e f g h", "a"], truncation=True, max_length=3)
    assert out.input_ids.shape == (2, 3)


def test_per_call_image_settings_do_not_stick(proc):
    before = proc.settings
    proc(text="<image>", images=IMAGE, do_normalize=False, size={"longest_edge": 512})
    assert proc.settings == before


def test_image_cost_takes_call_keywords(proc):
    assert proc.image_cost((480, 640), size={"longest_edge": 1024}).tiles == (2, 2)
    assert proc.image_cost((480, 640), images_kwargs={"do_image_splitting": False}).n_tiles == 1
    with pytest.raises(ProcessorError, match="did you mean 'longest_edge'"):
        proc.image_cost((480, 640), longest_edg=1024)
    assert proc.image_cost((480, 640)).patches == (13, 3, 4)


# ----------------------------------------------------------------------------- apply_chat_template

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"continue_final_message": True, "add_generation_prompt": True}, "both set"),
        ({"return_assistant_tokens_mask": True}, "return_assistant_tokens_mask=True is not supported"),
        ({"sanitize_control_tokens": True}, "sanitize_control_tokens=True is not supported"),
        ({"tools": [{"name": "f"}]}, "never reads 'tools'"),
        ({"padding": True}, "padding only apply with tokenize=True"),
        ({"return_dict": True}, "return_dict only apply with tokenize=True"),
        ({"add_generaton_prompt": True}, "unknown apply_chat_template keyword 'add_generaton_prompt'.*did you mean "
                                         "'add_generation_prompt'"),
        ({"tokenize": True, "paddin": True}, "did you mean 'padding'"),
        ({"chat_template": ""}, "not a Jinja template string"),
        ({"continue_final_message": "reasoning"}, "has no 'reasoning'"),
    ],
    ids=lambda v: ",".join(v) if isinstance(v, dict) else "",
)
def test_refused_chat_keywords(proc, kwargs, match):
    with pytest.raises(ProcessorError, match=match):
        proc.apply_chat_template(CHAT, **kwargs)


def test_chat_template_argument_is_rendered(proc):
    assert proc.apply_chat_template(CHAT, chat_template="{{ messages | length }}!{{ greeting }}", greeting="yo") == "2!yo"


def test_runaway_template_is_stopped(proc):
    with pytest.raises(ProcessorError, match="was stopped: .* over the output bound"):
        proc.apply_chat_template(CHAT, chat_template="{% for i in range(99999) %}{{ 'x' * 100 }}{% endfor %}")
    with pytest.raises(ProcessorError, match="was stopped: .* 10,000,000 items"):
        proc.apply_chat_template(CHAT, chat_template="{% for i in range(10**7) %}x{% endfor %}")


def test_images_named_by_url_are_refused(proc):
    chat = [{"role": "user", "content": [{"type": "image", "url": "http://x/y.png"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ProcessorError, match="does not fetch or open images"):
        proc.apply_chat_template(chat, tokenize=True)


def test_images_in_messages_and_argument_conflict(proc):
    chat = [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ProcessorError, match="both in the messages and as images="):
        proc.apply_chat_template(chat, tokenize=True, images=[IMAGE])


# ----------------------------------------------------------------------------- the table


def test_table_is_extensible_and_refuses_duplicates():
    name = "test_only_keyword"
    add_keywords(Keyword(name, "videos"), nesting={"videos_kwargs_test": "videos"})
    try:
        assert resolve_call_options({"videos_kwargs_test": {name: 3}}) == {name: 3}
        with pytest.raises(ValueError, match="already in the table"):
            add_keywords(Keyword("padding", "text"))
    finally:
        CALL_KEYWORDS.pop(name)
        GROUPS.pop("videos_kwargs_test")


def test_every_table_entry_is_checked_or_refused():
    for kw in CALL_KEYWORDS.values():
        assert kw.group in ("text", "images", "common"), kw
        assert kw.check is not None or kw.refused is not None, kw


def test_unpadded_batch_cannot_be_one_tensor(proc):
    with pytest.raises(ProcessorError, match=r"lengths \[1, 4\] after padding, which cannot form one tensor"):
        proc(text=["a", "a b c d"], padding=False)
    assert [len(r) for r in proc(text=["a", "a b c d"], padding=False, return_tensors=None)["input_ids"]] == [1, 4]
    with pytest.raises(ProcessorError, match="cannot form one tensor"):  # longer than max_length, not truncated
        proc(text=["a", "a b c d"], padding="max_length", max_length=2)


def test_accepted_values_equal_to_the_checkpoint(proc):
    base = proc(text="<image>hi", images=IMAGE)
    same = proc(text="<image>hi", images=IMAGE, image_seq_len=64, max_image_size={"longest_edge": 512}, device="cpu",
                return_row_col_info=True, verbose=False, disable_grouping=True)  # fmt: skip
    assert set(same) == set(base)
    assert all(torch.equal(same[k], base[k]) for k in base)


def test_check_options_validates_without_input(proc):
    proc.check_options(do_image_splitting=False, padding="max_length", max_length=8)
    with pytest.raises(ProcessorError, match="did you mean 'do_image_splitting'"):
        proc.check_options(do_image_split=False)
    with pytest.raises(ProcessorError, match="processor_kwargs must be a dict"):
        proc.apply_chat_template(CHAT, tokenize=True, processor_kwargs=["padding"])


def test_truncation_cutting_only_framing_tokens_is_refused(proc):
    """Left truncation (SmolVLM's truncation_side) that removes just the tokens before an image's
    placeholders leaves every <image> id but breaks the layout the model reads: refused too."""
    plain = proc(text="<image>x", images=IMAGE, do_image_splitting=False)
    n = plain.input_ids.shape[1]
    first_image = int((plain.input_ids[0] == proc.image_token_id).nonzero()[0])
    assert first_image >= 1  # framing tokens come first
    with pytest.raises(ProcessorError, match=r"would cut its image tokens \(64 of 64 left\)"):
        proc(text="<image>x", images=IMAGE, do_image_splitting=False, truncation=True, max_length=n - first_image)
    kept = proc(text="<image>x", images=IMAGE, do_image_splitting=False, truncation=True, max_length=n)
    assert torch.equal(kept.input_ids, plain.input_ids)
