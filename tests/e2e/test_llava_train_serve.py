"""A LLaVA checkpoint (a tiny random ``LlavaForConditionalGeneration`` saved by transformers, with
its ``LlavaProcessor`` files) trains with ``vlmkit.train`` (LoRA on backbone + connector: the
loss falls) and is served: an image request's token cost is transformers' count, its answer is
``model.generate``'s. Both image sides answer the processor's ``input_size`` / ``image_splitting``."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import vlmkit  # noqa: E402
from vlmkit.errors import ProcessorError  # noqa: E402

from ..conftest import BUNDLED  # noqa: E402
from ..parity.test_llava_processor import save_folder  # noqa: E402
from ..unit._train_tiny import write_digits  # noqa: E402
from ._serve_kit import as_processor_message, data_url, decoded, image_part, png, reference, user  # noqa: E402

SMOLVLM = BUNDLED / "SmolVLM-256M-Instruct"


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """``(folder, transformers' LlavaProcessor)`` of a tiny random llava checkpoint: 16 px crops of
    4 px patches, strategy ``default`` with one additional token: 16 image tokens per image."""
    folder = tmp_path_factory.mktemp("llava")
    tokenizer = transformers.AutoTokenizer.from_pretrained(SMOLVLM)
    ref, _ = save_folder(folder, tokenizer, model=True)
    return folder, ref


def test_both_image_sides_answer_input_size_and_splitting(llava):
    proc = vlmkit.load_processor(llava[0])
    assert (proc.input_size, proc.image_splitting, proc.image_seq_len) == ((16, 16), None, 16)
    tiled = vlmkit.load_processor(SMOLVLM)
    assert (tiled.input_size, tiled.image_splitting) == ((512, 512), True)


@pytest.mark.parametrize("size", [(20, 30), (41, 17), (16, 16), (9, 13), (480, 640)])
def test_image_cost_is_transformers_count(llava, size):
    folder, ref = llava
    proc = vlmkit.load_processor(folder)
    cost = proc.image_cost(size)
    want = ref._get_num_multimodal_tokens(image_sizes=[list(size)])
    assert (cost.visual_tokens, cost.n_tiles) == (want.num_image_tokens[0], want.num_image_patches[0]) == (16, 1)
    assert cost.resized_size == (16, 16) and cost.tiles == (0, 0)
    text = proc.apply_chat_template([as_processor_message("Hi", 1)])
    ids = ref(text=text, images=[decoded(png(size[::-1]))], return_tensors="pt")["input_ids"]
    assert proc.prompt_cost(text, [decoded(png(size[::-1]))]).total_tokens == ids.shape[1]


def test_a_spec_that_does_not_fit_the_files_is_refused(llava):
    model = vlmkit.build_from_hf(llava[0])
    assert vlmkit.load_processor(llava[0], spec=model.spec).image_seq_len == 16  # the model's own spec fits
    other = model.spec.model_copy(update={"vision_tower": model.spec.vision_tower.model_copy(
        update={"params": model.spec.vision_tower.params.model_copy(update={"image_size": 32})})})  # fmt: skip
    with pytest.raises(ProcessorError, match=r"takes 32x32 px images of 64 visual tokens, the files make 16x16 px"):
        vlmkit.load_processor(llava[0], spec=other)


def _losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_training_on_a_llava_checkpoint_lowers_the_loss(llava, tmp_path, one_thread):
    folder, _ = llava
    data = write_digits(tmp_path / "digits", train_rows=8, heldout_rows=4)
    stage = {"name": "lora", "train": [], "lora": {"slots": ["backbone", "connector"], "r": 8}, "steps": 12, "lr": 1e-2}
    recipe = {"model": str(folder), "data": {"train": str(data["train"])}, "stages": [stage], "batch_size": 8,
              "seed": 0, "output_dir": str(tmp_path / "run"), "save_every": None}  # fmt: skip
    run = vlmkit.train(recipe)
    losses = _losses(run)
    assert len(losses) == 12 and losses[-1] < losses[0] - 1.0, losses  # measured: 10.89 -> 9.52
    trained, base = vlmkit.build(run), vlmkit.build_from_hf(folder)
    assert not torch.equal(trained.connector.linear_1.weight, base.connector.linear_1.weight)  # LoRA merged into it
    assert vlmkit.load_processor(run).image_seq_len == 16  # the run folder keeps the llava image side
    with pytest.raises(ProcessorError, match="never splits images"):
        vlmkit.train({**recipe, "image_splitting": True, "output_dir": str(tmp_path / "run2")})


def test_serve_takes_a_llava_image(llava):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from vlmkit.serve import ServerThread, check_options

    folder, _ = llava
    model, proc = vlmkit.build_from_hf(folder), vlmkit.load_processor(folder)
    data = png((40, 30))
    with ServerThread(model, proc, check_options(port=0, max_batch=2), model_name="llava") as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
        for detail in (None, "low"):
            reply = client.chat.completions.create(model="llava", temperature=0, max_tokens=6,
                                                   messages=[user("What is it?", image_part(data_url(data), detail))])  # fmt: skip
            want, reason, prompt = reference(model, proc, [as_processor_message("What is it?", 1)], [decoded(data)], 6)
            assert reply.choices[0].message.content == want and reply.choices[0].finish_reason == reason
            assert reply.usage.prompt_tokens == prompt == proc.prompt_cost(
                proc.apply_chat_template([as_processor_message("What is it?", 1)]), [decoded(data)]).total_tokens  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="detail='high' is not supported"):
            client.chat.completions.create(model="llava", max_tokens=2,
                                           messages=[user("What is it?", image_part(data_url(data), "high"))])  # fmt: skip
