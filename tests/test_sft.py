"""`vpt-agent train`: VPT_Datasets conversations become what the session feeds the model; LoRA and full
fine-tuning on transformers' Trainer lower the loss and save a model the graph loads; a killed run
resumes to the same loss curve; two processes give one process's losses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vpt_agent import build_graph
from vpt_agent.cli import main
from vpt_agent.data.token_labels import IGNORE
from vpt_agent.evaluation.datasets import export_synthetic, read_dataset
from vpt_agent.images import load_image
from vpt_agent.model.loading import load_tokenizer
from vpt_agent.model.modeling import VPTForConditionalGeneration, VPTQwen2_5ForConditionalGeneration
from vpt_agent.model.session import VPTSession
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.perception.crop import crops
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.perception.reencode import branch_features
from vpt_agent.prompts import build_question
from vpt_agent.tokens import BRANCHES, IM_END, REGION_END, REGION_START, parse_actions
from vpt_agent.training.data import Collator, build_sample, read_sft_items
from vpt_agent.training.options import SFTOptions
from vpt_agent.training.trainer import LOG, last_checkpoint, token_mean_loss, train

MAX_PIXELS = 112 * 112
"""The tiny base's ViT sees at most 4x4 merged tokens an image: steps of a fraction of a second."""
STEPS = 30
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny random VPT checkpoint (DINO branch) with its tokenizer, in the Hugging Face layout."""
    path = tmp_path_factory.mktemp("base")
    model, tokenizer = tiny_vpt_model(branches=("dino",), image_max_pixels=MAX_PIXELS)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[Path]:
    """Two VPT_Datasets files from the synthetic benchmark: region and re-encoding conversations,
    their scenes scaled to a third (smaller PNGs to read)."""
    folder = tmp_path_factory.mktemp("data")
    files = [export_synthetic(folder / "synthetic_region_train.json", 6, mode="region"),
             export_synthetic(folder / "synthetic_action_train.json", 6, mode="reencode", seed=1)]
    for png in folder.glob("*_images/*.png"):
        with Image.open(png) as image:
            small = image.resize((image.width // 3, image.height // 3))
        small.save(png)
    return files


def options(base: Path, data: list[Path], out: Path, **overrides) -> SFTOptions:
    fields = dict(base=str(base), data=[str(f) for f in data], out=str(out), max_steps=STEPS, batch_size=2,
                  logging_steps=1, save_steps=10, lr=1e-3, seed=0)
    return SFTOptions(**{**fields, **overrides})


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / LOG).read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.fixture(scope="module")
def full_run(base, data, tmp_path_factory) -> Path:
    """30 uninterrupted full fine-tuning steps, checkpointed every 10."""
    return train(options(base, data, tmp_path_factory.mktemp("full"), method="full"))


# --------------------------------------------------------------------------------------- sequences
def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_turns(path: Path, branch: str | None = None) -> list[str]:
    """The assistant turns of a file's first conversation, a re-encoding request as ``branch``'s."""
    messages = json.loads(path.read_text())[0]["messages"]
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    return [BRANCHES[branch].action_text if branch and "_action_start|>" in t else t for t in turns]


def session_conversation(model, tokenizer, path: Path, branch: str | None = None) -> list[int]:
    """What `VPTSession` holds for a file's first conversation as the eval runs it (the eval reader's
    question in its prompt mode), forced to the conversation's assistant turns."""
    question = read_dataset(path).items[0]
    image = load_image(question.image)
    session = VPTSession(model, tokenizer)
    session.start([image], [build_question(question.question, question.prompt_mode)])
    for text in assistant_turns(path, branch):
        said = session.generate(64, forced={0: ids(tokenizer, text + IM_END)})[0]
        parsed = parse_actions(said.text, (image.shape[2], image.shape[1]))
        if parsed.kind == "region":
            session.add_regions(0, crops(image, [r.box for r in parsed.regions]))
        elif parsed.kind == "reencode":
            session.add_reencode(0, parsed.reencode.branch, branch_features(model, parsed.reencode.branch, [image])[0])
    return session.conversation(0)


@pytest.mark.parametrize("split, branch, clip_pixels", [(0, None, None), (1, None, None), (1, "clip", None),
                                                      (1, "clip", 112 * 168)])
def test_the_training_sequence_is_what_the_session_feeds(data, split, branch, clip_pixels):
    """Region and re-encoding conversations (re-encoding also trained as clip's, within the global view's
    budget or beyond it): the same token ids as the session forced to the same assistant turns; labels
    on the assistant turns alone."""
    model, tokenizer = tiny_vpt_model(branches=("dino", "clip"), image_max_pixels=MAX_PIXELS,
                                      clip_max_pixels=clip_pixels)
    item = read_sft_items([data[split]], model.config.branches, branch)[0]
    image = load_image(item.image)
    sample = build_sample(item, image, tokenizer, model.image_processor, model.config)
    assert sample.input_ids.tolist() == session_conversation(model, tokenizer, data[split], branch)

    expected = ids(tokenizer, "".join(text + IM_END for text in assistant_turns(data[split], branch)))
    assert sample.labels[sample.labels != IGNORE].tolist() == expected
    if split == 0:
        regions = parse_actions(item.rounds[0].assistant, (image.shape[2], image.shape[1])).regions
        pixels, grid = qwen_pixel_values([image, *crops(image, [r.box for r in regions])], max_pixels=MAX_PIXELS)
        assert torch.equal(sample.pixel_values, pixels) and torch.equal(sample.image_grid_thw, grid)
    else:
        assert set(sample.branch_inputs) == ({"clip_pixel_values", "clip_images_grid_thw"} if branch == "clip"
                                             else {"detection_images"})


def test_several_regions_are_shown_as_numbered_crops(data, tmp_path):
    record = json.loads(data[0].read_text())[0]
    two = f"{REGION_START}<|x_0|><|y_0|>{REGION_END}{REGION_START}<|x_6|><|x_7|><|y_7|>{REGION_END}"
    record["messages"][1]["content"] = two
    record["images"] = [str(data[0].parent / record["images"][0])]
    path = tmp_path / "two.json"
    path.write_text(json.dumps([record]))
    model, tokenizer = tiny_vpt_model(branches=("dino",), image_max_pixels=MAX_PIXELS)
    item = read_sft_items([path], model.config.branches)[0]
    sample = build_sample(item, load_image(item.image), tokenizer, model.image_processor, model.config)
    assert sample.input_ids.tolist() == session_conversation(model, tokenizer, path)
    assert len(sample.image_grid_thw) == 3 and "Region 1: " in tokenizer.decode(sample.input_ids)


def test_the_loss_reads_only_the_logits_it_needs(data):
    """The collator's `logits_to_keep` (positions followed by a supervised token) gives the loss and
    the gradients of every position's logits, from a few of the positions."""
    model, tokenizer = tiny_vpt_model(branches=("dino",), image_max_pixels=MAX_PIXELS)
    items = [read_sft_items([path], ("dino",))[0] for path in data]
    batch = Collator(model, model.config.text_config.pad_token_id)(
        [build_sample(item, load_image(item.image), tokenizer, model.image_processor, model.config) for item in items])
    labels, keep = batch.pop("labels"), batch.pop("logits_to_keep")
    assert 0 < len(keep) < labels.shape[1] // 2
    assert torch.equal(keep, (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1))
    results = []
    for kept in (keep, 0):
        model.zero_grad()
        outputs = model(**batch, logits_to_keep=kept)
        loss = token_mean_loss(outputs, labels)
        loss.backward()
        results.append((outputs.logits.shape[1], loss.item(), model.lm_head.weight.grad.clone()))
    (kept_positions, kept_loss, kept_grad), (all_positions, all_loss, all_grad) = results
    assert (kept_positions, all_positions) == (len(keep), labels.shape[1])
    assert kept_loss == pytest.approx(all_loss, rel=1e-6)
    with torch.no_grad():  # the model's own loss from the collator's whole batch: the mean over supervised tokens
        assert model(**batch, labels=labels, logits_to_keep=keep).loss.item() == pytest.approx(
            model(**batch, labels=labels).loss.item(), rel=1e-6)
    torch.testing.assert_close(kept_grad, all_grad, rtol=1e-5, atol=1e-7)


def test_checkpointing_runs_no_backward_through_the_frozen_vision_tower(data):
    """With activation checkpointing on (as the trainer turns it on), the token embeddings' output
    requires gradients and the ViT's does not; loss and gradients equal those without checkpointing."""
    model, tokenizer = tiny_vpt_model(branches=("dino",), image_max_pixels=MAX_PIXELS)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("model.language_model.layers."))
    item = read_sft_items([data[0]], ("dino",))[0]
    batch = Collator(model, model.config.text_config.pad_token_id)(
        [build_sample(item, load_image(item.image), tokenizer, model.image_processor, model.config)])
    labels = batch.pop("labels")
    seen = {}
    model.model.visual.register_forward_hook(lambda module, args, out: seen.update(vision=out.pooler_output))
    model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.update(tokens=out))
    results = []
    for checkpointing in (True, False):
        model.zero_grad()
        (model.activation_checkpointing_enable if checkpointing else model.activation_checkpointing_disable)()
        loss = token_mean_loss(model(**batch), labels)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        if checkpointing:
            assert seen["tokens"].requires_grad and not seen["vision"].requires_grad
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for with_checkpoints, without in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(with_checkpoints, without, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------- training
def test_full_fine_tuning_lowers_the_loss_and_saves_a_graph_model(base, data, full_run):
    curve = losses(full_run)
    assert len(curve) == STEPS and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    changed = changed_weights(full_run, base)
    assert any(".mlp.up_proj." in name for name in changed) and "lm_head.weight" in changed
    assert not any(name.startswith(("model.visual.", "detection_model.")) for name in changed)
    assert_graph_answers(full_run, base, data)


def test_lora_lowers_the_loss_and_saves_the_merged_model(base, data, tmp_path):
    out = train(options(base, data, tmp_path, method="lora", save_steps=STEPS))
    curve = losses(out)
    assert len(curve) == STEPS and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    changed = changed_weights(out, base)  # and no adapter left over
    assert any(".q_proj." in name for name in changed) and any("detection_projector" in name for name in changed)
    assert not any(name.startswith(("model.visual.", "detection_model.")) for name in changed)
    assert_graph_answers(out, base, data)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_qwen2_5_vl_base_trains_to_a_graph_model(data, tmp_path, method):
    base = tmp_path / "base"
    model, tokenizer = tiny_vpt_model(arch="qwen2_5_vl", branches=("dino",), image_max_pixels=MAX_PIXELS)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = train(options(base, data, tmp_path / "out", method=method, save_steps=STEPS))
    curve = losses(out)
    assert len(curve) == STEPS and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.3
    assert isinstance(VPTForConditionalGeneration.from_pretrained(out), VPTQwen2_5ForConditionalGeneration)
    changed = changed_weights(out, base)
    assert any(".q_proj." in name for name in changed) and any("detection_projector" in name for name in changed)
    assert not any(name.startswith(("model.visual.", "detection_model.")) for name in changed)
    assert_graph_answers(out, base, data)


def test_the_alignment_stage_trains_the_projectors_alone(base, data, tmp_path):
    out = train(options(base, data, tmp_path, method="projectors", save_steps=STEPS))
    curve = losses(out)
    assert len(curve) == STEPS and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5
    changed = changed_weights(out, base)
    assert changed and all(name.startswith("detection_projector.") for name in changed)


def changed_weights(out: Path, base: Path) -> set[str]:
    """The weights that training changed; the saved model has the base's weight names."""
    trained = VPTForConditionalGeneration.from_pretrained(out).state_dict()
    start = VPTForConditionalGeneration.from_pretrained(base).state_dict()
    assert set(trained) == set(start)
    return {name for name, tensor in trained.items() if not torch.equal(tensor, start[name])}


def assert_graph_answers(out: Path, base: Path, data: list[Path]) -> None:
    """The graph loads the saved model and runs a training question through it; the model it loads
    is the trained one (a training conversation's loss well below the base's). A 30-step tiny model
    may stop at once or leave a region unclosed: such an answer is recorded as its error, not raised."""
    item = read_sft_items([data[0]], ("dino",))[0]
    result = build_graph(out, device="cpu").invoke({"image": item.image, "q": item.question})
    assert result["steps"][-1]["node"] == "answer"
    assert result["error"] is None or result["error"].startswith("BadModelOutputError: ")
    assert conversation_loss(out, item) < conversation_loss(base, item) - 0.5


def conversation_loss(path: Path, item) -> float:
    model = VPTForConditionalGeneration.from_pretrained(path)
    sample = build_sample(item, load_image(item.image), load_tokenizer(path), model.image_processor, model.config)
    batch = Collator(model, model.config.text_config.pad_token_id)([sample])
    with torch.no_grad():
        return model(**batch).loss.item()


def test_a_killed_run_resumes_to_the_same_loss_curve(base, data, full_run, tmp_path):
    """Killed after its step-20 checkpoint, `--resume` continues to the uninterrupted run's losses."""
    args = ["train", "--base", str(base), "--data", str(data[0]), "--data", str(data[1]), "--out", str(tmp_path),
            "--full", "--max-steps", str(STEPS), "--batch-size", "2", "--lr", "1e-3", "--seed", "0",
            "--save-steps", "10", "--logging-steps", "1"]
    run = subprocess.Popen([sys.executable, "-m", "vpt_agent.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while last_checkpoint(tmp_path) != str(tmp_path / "checkpoint-20"):
            assert run.poll() is None, "the run ended before its step-20 checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
    assert not (tmp_path / LOG).exists()
    (tmp_path / "checkpoint-30").mkdir(exist_ok=True)  # as if killed while saving at step 30: passed over
    assert main(args) == 1  # an earlier run's checkpoints: --resume or another --out
    assert main([*args, "--resume"]) == 0
    assert losses(tmp_path) == pytest.approx(losses(full_run), rel=1e-4)


def test_two_processes_give_one_process_losses(base, data, tmp_path):
    """torchrun (gloo, CPU), 2 processes x 2 conversations against 1 process x 4."""
    steps = ["--max-steps", "4", "--lr", "1e-3", "--seed", "0", "--logging-steps", "1", "--save-steps", "100", "--full"]
    common = ["train", "--base", str(base), "--data", str(data[0]), "--data", str(data[1]), *steps]
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "4"]) == 0
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "vpt_agent.cli", *common, "--out", str(tmp_path / "two"), "--batch-size", "2"]
    done = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert done.stderr.count(" 0/4 [") == 1 and " 4/4 [" in done.stderr  # one progress bar, the first process's
    assert "{'loss': " in done.stderr and done.stdout.strip() == str(tmp_path / "two")  # stdout: the result alone


def test_a_config_file_bf16_checkpointing_and_an_unmerged_adapter(base, data, tmp_path, capsys):
    """Options from a JSON --config (the command line wins); the peft adapter saved alone; no progress bar."""
    out = tmp_path / "out"
    config = dict(base=str(base), data=[str(data[0])], out=str(out), max_steps=3, logging_steps=1, bf16=True,
                  gradient_checkpointing=True, merge_lora=False)
    (tmp_path / "sft.json").write_text(json.dumps(config))
    assert main(["train", "--config", str(tmp_path / "sft.json"), "--max-steps", "2", "--no-progress"]) == 0
    assert "2/2 [" not in capsys.readouterr().err
    assert len(losses(out)) == 2 and all(0 < loss < 20 for loss in losses(out))
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--data", "missing.json"], "--data: no such file: missing.json"),
    (["--config", "missing.yaml"], "--config: cannot read missing.yaml"),
])
def test_bad_arguments_fail_in_one_line(base, tmp_path, capsys, argv, message):
    assert main(["train", "--base", str(base), "--out", str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_a_config_file_sets_options_and_rejects_unknown_ones(base, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("[not json")
    (tmp_path / "c.yaml").write_text(f"base: {base}\nout: {tmp_path / 'out'}\ndata: {tmp_path / 'bad.json'}\n")
    assert main(["train", "--config", str(tmp_path / "c.yaml")]) == 1
    assert "bad.json is not a readable JSON file" in capsys.readouterr().err
    (tmp_path / "u.yaml").write_text("learning_rate: 1\n")
    assert main(["train", "--config", str(tmp_path / "u.yaml")]) == 1
    assert "unknown option(s) ['learning_rate']" in capsys.readouterr().err


def test_an_unknown_branch_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--branch", "hog"])
    assert exit.value.code == 2 and "invalid choice: 'hog'" in capsys.readouterr().err
