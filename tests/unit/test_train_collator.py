"""The training collator against SmolVLM's real chat template, and bad rows.

Labels must be -100 everywhere except the assistant turns' tokens (the answer and its
``<end_of_utterance>``); image, layout and pad tokens never count; the ids are the processor's.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

import vlmkit
from vlmkit.errors import DataError
from vlmkit.train import IGNORE_INDEX, Collator, load_rows
from vlmkit.train.data import check_rows

from ._train_tiny import TOKENIZER


@pytest.fixture(scope="module")
def processor():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the published files disagree on bos/eos (SpecWarning), as documented
        return vlmkit.load_processor(TOKENIZER)


def _labelled(processor, ids, labels) -> list[str]:
    return [processor.tokenizer.id_to_token(i) for i, lab in zip(ids, labels) if lab != IGNORE_INDEX]


def _user(text, images=0):
    return {"role": "user", "content": [*({"type": "image"} for _ in range(images)), {"type": "text", "text": text}]}


def _assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_one_turn_labels_the_answer_and_end_of_utterance_only(processor):
    image = Image.new("RGB", (40, 30), (200, 10, 10))
    row = {"images": [image], "messages": [_user("What digit is this?", images=1), _assistant("7")]}
    ids, labels, _ = Collator(processor, do_image_splitting=False).encode(row)
    # "Assistant: 7<end_of_utterance>\n": the space, the digit and the end of turn; not the newline
    assert _labelled(processor, ids, labels) == ["Ġ", "7", "<end_of_utterance>"]
    eou = processor.tokenizer.token_to_id("<end_of_utterance>")
    assert labels[ids.index(eou, ids.index(eou) + 1)] == eou and labels[-1] == IGNORE_INDEX  # trailing "\n"
    # the same ids the processor produces for the rendered conversation
    text = processor.apply_chat_template(row["messages"], add_generation_prompt=False)
    assert processor(text=text, images=[image], do_image_splitting=False)["input_ids"][0].tolist() == ids


def test_multi_turn_rows_label_every_assistant_turn_and_nothing_else(processor):
    messages = [{"role": "system", "content": "Answer with one word."}, _user("Colour?", images=1), _assistant("red"),
                _user("And the shape?"), _assistant("a square")]  # fmt: skip
    row = {"images": [Image.new("RGB", (64, 64), (255, 0, 0))], "messages": messages}
    ids, labels, _ = Collator(processor, do_image_splitting=False).encode(row)
    assert _labelled(processor, ids, labels) == ["Ġred", "<end_of_utterance>", "Ġa", "Ġsquare", "<end_of_utterance>"]
    # string contents (the system turn) work as list contents do
    assert "Answer with one word." in processor.tokenizer.decode(ids)


def test_image_and_layout_tokens_never_count_even_in_an_assistant_turn(processor):
    """With image splitting on, a 1000x600 image becomes tiles framed by <fake_token_around_image>,
    <row_r_col_c> and <global-img>; an image inside the assistant turn must still not be a label."""
    big = Image.new("RGB", (1000, 600), (0, 90, 200))
    row = {"images": [big, big], "messages": [_user("Describe", images=1),
                                              {"role": "assistant", "content": [{"type": "text", "text": "like"},
                                                                                {"type": "image"}]}]}  # fmt: skip
    collator = Collator(processor)  # the checkpoint's own splitting (on)
    ids, labels, _ = collator.encode(row)
    layout = {processor.image_token_id, processor.tokenizer.token_to_id("<fake_token_around_image>"),
              processor.tokenizer.token_to_id("<global-img>"), processor.tokenizer.token_to_id("<row_1_col_1>")}  # fmt: skip
    assert layout <= set(ids)  # they are in the prompt...
    assert not layout & {lab for lab in labels if lab != IGNORE_INDEX}  # ...and never labels
    assert _labelled(processor, ids, labels)[:2] == ["Ġlike", "<end_of_utterance>"]
    assert ids.count(processor.image_token_id) == 2 * collator.processor.image_cost(big).visual_tokens


def test_a_batch_is_right_padded_with_masked_unlabelled_pads(processor):
    rows = [{"images": [], "messages": [_user("Hi"), _assistant("Hello there, friend")]},
            {"images": [Image.new("L", (8, 8), 128)], "messages": [_user("Digit?", images=1), _assistant("3")]}]  # fmt: skip
    batch = Collator(processor, do_image_splitting=False)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "pixel_values", "pixel_attention_mask"}
    b, t = batch["input_ids"].shape
    assert batch["labels"].shape == batch["attention_mask"].shape == (b, t) == (2, t)
    pads = batch["attention_mask"] == 0
    assert pads.any() and bool((batch["labels"][pads] == IGNORE_INDEX).all())
    assert bool((batch["input_ids"][pads] == processor.pad_token_id).all())
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]  # right padding
    assert batch["pixel_values"].shape[:2] == (2, 1)
    assert torch.count_nonzero(batch["pixel_values"][0]) == 0  # the text-only row's image slot is padding


def _write_rows(tmp_path, rows) -> str:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _good(image="a.png"):
    return {"images": [image], "messages": [_user("Q", images=1), _assistant("7")]}


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ({"images": [], "messages": [_user("Q")]}, "row 1: key 'messages' has no assistant turn"),
        ({"images": ["a.png", "a.png"], "messages": [_user("Q", images=1), _assistant("7")]},
         "row 1: key 'images' lists 2 image(s) but 'messages' holds 1 image part(s)"),
        ({"images": [], "messages": [_user("Q", images=1), _assistant("7")]},
         "row 1: key 'images' lists 0 image(s) but 'messages' holds 1 image part(s)"),
        (_good("missing.png"), "row 1: images[0]: image file"),
        (_good("corrupt.png"), "row 1: images[0]: "),
    ],
)
def test_bad_rows_name_the_row_and_key(tmp_path, bad, words):
    Image.new("L", (8, 8), 50).save(tmp_path / "a.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    source = _write_rows(tmp_path, [_good(), bad])
    ds, root = load_rows(source)
    with pytest.raises(DataError) as info:
        check_rows(ds, root, source)
    assert f"{source}: {words}" in str(info.value)
    if "corrupt" in json.dumps(bad):
        assert "not a readable image" in str(info.value)
    if "missing" in json.dumps(bad):
        assert "does not exist" in str(info.value)


def test_a_python_dataset_with_pil_images_works(processor):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"images": [Image.new("RGB", (16, 16), (9, 9, 9))],
                                      "messages": [_user("Q", images=1), _assistant("4")]}])  # fmt: skip
    ds = ds.cast_column("images", datasets.Sequence(datasets.Image()))
    rows, root = load_rows(ds)
    check_rows(rows, root, "python rows")
    batch = Collator(processor, do_image_splitting=False)([rows[0]])
    assert batch["pixel_values"].shape[:2] == (1, 1)
