"""Training conversations equal what `VPTSession` builds; labels; a few steps lower the loss;
train() saves a loadable bundle and resumes exactly."""
from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import torch

import vpt_agent.train as train_module
from vpt_agent.data.conversations import (
    BLOCK_QUESTION,
    GROUNDING_QUESTION,
    IGNORE,
    block_reading_example,
    build_example,
    grounding_example,
    reading_example,
    region_text,
)
from vpt_agent.data.synthetic import COLOURS, GLYPHS, SHAPES, block_scene, cells_covering, generate
from vpt_agent.data.token_labels import COLUMNS, NAMES, VIEWS_PER_BLOCK, block_view
from vpt_agent.model.loading import load_tokenizer
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.model.session import VPTSession
from vpt_agent.model.tiny import TINY_DINO, tiny_vpt_model
from vpt_agent.perception.crop import crop
from vpt_agent.perception.qwen_image import num_image_tokens, qwen_pixel_values
from vpt_agent.perception.reencode import branch_features
from vpt_agent.tokens import BRANCHES, IM_END, IMAGE_PAD, parse_actions, region_box
from vpt_agent.prompts import build_question, first_turn_ids
from vpt_agent.train import (
    DEMO_MAX_PIXELS,
    TASKS,
    Conversations,
    TrainArgs,
    collate,
    demo_config,
    demo_tokenizer,
    focus_loss,
    TokenHead,
    train,
    train_step,
)

TINY = dict(  # demo_config overrides: a model that trains in seconds on a CPU
    hidden=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
    vision_config={"depth": 1, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 2, "hidden_size": 32,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    detection_encoder_config=dict(TINY_DINO, num_hidden_layers=1),
)


@pytest.fixture(scope="module")
def tiny():
    return tiny_vpt_model(branches=("dino",), seed=0)


@pytest.fixture(scope="module")
def item():
    return generate(0, 1, ("fine_detail",))[0]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("mode", ["region", "reencode", "free", "direct"])
def test_conversation_equals_the_session_layout(tiny, item, mode):
    """The session, forced to the example's assistant turns, holds exactly the example's ids."""
    model, tokenizer = tiny
    example = build_example(item, mode, tokenizer)
    session = VPTSession(model, tokenizer)
    session.start([item.image], [build_question(item.question, mode)])
    answer = ids(tokenizer, item.answer + IM_END)
    if mode == "direct":
        session.generate(len(answer), forced={0: answer})
    elif mode == "reencode":
        session.generate(3, forced={0: ids(tokenizer, BRANCHES["dino"].action_text)})
        session.add_reencode(0, "dino", branch_features(model, "dino", [item.image])[0])
        session.generate(len(answer), forced={0: answer})
    else:  # region, and free on fine_detail
        turn = session.generate(24, forced={0: ids(tokenizer, region_text(item.cells) + IM_END)})[0]
        regions = parse_actions(turn.text, item.size).regions
        session.add_regions(0, [crop(item.image, r.box) for r in regions])
        session.generate(len(answer), forced={0: answer})
        pixel_values, grid = qwen_pixel_values([item.image, crop(item.image, regions[0].box)])
        assert torch.equal(example.pixel_values, pixel_values) and torch.equal(example.image_grid_thw, grid)
    assert example.input_ids.tolist() == session.conversation(0)


def test_labels_cover_assistant_turns_only(tiny, item):
    model, tokenizer = tiny

    def supervised(example) -> str:
        pairs = zip(example.input_ids.tolist(), example.labels.tolist())
        return tokenizer.decode([token for token, label in pairs if label != IGNORE], skip_special_tokens=False)

    region = build_example(item, "region", tokenizer)
    assert supervised(region) == region_text(item.cells) + IM_END + item.answer + IM_END
    dino = BRANCHES["dino"]
    reencode = build_example(item, "reencode", tokenizer)
    assert supervised(reencode) == dino.action_text + IM_END + item.answer + IM_END
    assert reencode.detection_images.shape == (1, 3, 224, 224)
    reference = build_example(item, "reencode", tokenizer, action_labels=False)
    assert reference.input_ids.tolist() == reencode.input_ids.tolist()
    assert supervised(reference) == dino.action_start + IM_END + item.answer + IM_END  # as the reference masks
    assert supervised(build_example(item, "direct", tokenizer)) == item.answer + IM_END
    other = generate(0, 8, ("counting",))[0]
    assert supervised(build_example(other, "free", tokenizer)) == other.answer + IM_END  # free crops fine_detail only
    # and re-encodes counting with a clip branch that sees more than the global view
    finer = dict(max_pixels=DEMO_MAX_PIXELS, branch="clip", clip_max_pixels=CLIP_PIXELS)
    counted = build_example(other, "free", tokenizer, **finer)
    assert supervised(counted) == BRANCHES["clip"].action_text + IM_END + other.answer + IM_END
    assert counted.clip is not None and counted.detection_images is None
    spatial = generate(0, 8, ("spatial",))[0]
    assert supervised(build_example(spatial, "free", tokenizer, **finer)) == spatial.answer + IM_END
    for same in (None, DEMO_MAX_PIXELS):  # a clip re-encoding at the global view's budget shows nothing more
        assert supervised(build_example(other, "free", tokenizer, **finer | {"clip_max_pixels": same})) == (
            other.answer + IM_END)


def test_grounding_conversation_names_and_locates_every_object(tiny, item):
    model, tokenizer = tiny
    example = grounding_example(item, tokenizer)
    prompt = [t for t, label in zip(example.input_ids.tolist(), example.labels.tolist()) if label == IGNORE]
    assert prompt == first_turn_ids(tokenizer, GROUNDING_QUESTION, num_image_tokens(example.image_grid_thw))
    answer = tokenizer.decode(example.labels[len(prompt):].tolist(), skip_special_tokens=False)
    lines = answer.removesuffix(IM_END).split("\n")
    assert len(lines) == len(item.objects)
    located = {}
    for line in lines:
        name, _, region = line.partition("<|region_token_start|>")
        (cells,) = [r.cells for r in parse_actions("<|region_token_start|>" + region, item.size).regions]
        located[name] = cells
    assert located == {o.name: cells_covering(o.box, item.size) for o in item.objects}
    order = [(list(COLOURS).index(name.split()[0]), SHAPES.index(name.split()[1])) for name in located]
    assert order == sorted(order)  # by colour, then shape: not by position


def test_block_reading_conversation_reads_nine_glyphs_at_crop_scale(tiny):
    model, tokenizer = tiny
    image, objects, cells = block_scene(0, 3)
    size = (image.shape[2], image.shape[1])
    box = region_box(cells, size)[1]
    assert len(objects) == 9 and all(_inside(o.box, box) for o in objects)  # the crop holds the whole block
    assert {cells_covering(o.box, size) for o in objects} == {
        (x, y, x, y) for x in range(cells[0] - 1, cells[0] + 2) for y in range(cells[1] - 1, cells[1] + 2)}
    example = block_reading_example(0, 3, tokenizer)
    pixel_values, grid = qwen_pixel_values([crop(image, box)])
    assert torch.equal(example.pixel_values, pixel_values)
    prompt = first_turn_ids(tokenizer, BLOCK_QUESTION, num_image_tokens(grid))
    answer = "\n".join(f"{o.name} {o.glyph}" for o in objects) + IM_END
    assert example.labels.tolist() == [IGNORE] * len(prompt) + ids(tokenizer, answer)
    rows = [cells_covering(o.box, size)[1::-1] for o in objects]
    assert rows == sorted(rows)  # reading order


def test_block_views_move_and_scale_the_blocks_crop():
    views = [block_view(0, i, DEMO_MAX_PIXELS) for i in range(2 * VIEWS_PER_BLOCK)]
    image, objects, cells = block_scene(0, 0)  # the first VIEWS_PER_BLOCK views' scene
    grids = {tuple(v.image_grid_thw[0].tolist()) for v in views[:VIEWS_PER_BLOCK]}
    assert len(grids) > 1 or len({v.pixel_values.sum().item() for v in views[:VIEWS_PER_BLOCK]}) > 1
    for view in views:
        names = view.token_labels[:, 0]
        assert 5 <= (names > 0).sum() <= 9 and ((names > 0) == (view.token_labels[:, 3] != IGNORE)).all()
        assert (view.token_labels[:, 1:3] == IGNORE).all()  # no position: not a global view
    # the first view holds the centre object of scene 0's block, with its glyph
    (centre,) = [o for o in objects if cells_covering(o.box, (image.shape[2], image.shape[1]))[:2] == cells[:2]]
    glyphs = {GLYPHS[g] for n, g in views[0].token_labels[:, [0, 3]].tolist() if n == 1 + NAMES.index(
        (centre.colour, centre.shape))}
    assert glyphs == {centre.glyph}
    assert block_view(0, 5, DEMO_MAX_PIXELS).pixel_values.equal(views[5].pixel_values)  # deterministic


def _inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def test_reading_conversation_shows_the_crop_alone(tiny, item):
    model, tokenizer = tiny
    example = reading_example(item, tokenizer)
    view = crop(item.image, region_box(item.cells, item.size)[1])
    pixel_values, grid = qwen_pixel_values([view])
    assert torch.equal(example.pixel_values, pixel_values) and torch.equal(example.image_grid_thw, grid)
    prompt = first_turn_ids(tokenizer, item.question, num_image_tokens(grid))
    assert example.input_ids.tolist() == prompt + ids(tokenizer, item.answer + IM_END)
    assert example.labels.tolist() == [IGNORE] * len(prompt) + ids(tokenizer, item.answer + IM_END)


def test_token_labels_name_each_objects_token_its_cell_and_at_crop_scale_its_glyph(tiny, item):
    model, tokenizer = tiny
    example = build_example(item, "region", tokenizer, max_pixels=DEMO_MAX_PIXELS)
    (_, h0, w0), (_, h1, w1) = example.image_grid_thw.tolist()
    first, crop_labels = example.token_labels.split([h0 * w0 // 4, h1 * w1 // 4])
    rows, cols = h0 // 2, w0 // 2
    for obj in item.objects:  # the global view: the object's name in the token over its centre
        (cx, cy), (width, height) = obj.centre, item.size
        index = int(cy * rows / height) * cols + int(cx * cols / width)
        assert NAMES[first[index, 0] - 1] == (obj.colour, obj.shape)
        assert first[index, 3] == IGNORE  # unreadable there
    assert (first[:, 0] > 0).sum() == len(item.objects)
    x, y = cells_covering(item.about[0].box, item.size)[:2]  # a token's cell: where its centre lies
    assert (first[:, 1] == x).sum() == rows * cols // 8 and (first[:, 2] == y).sum() == rows * cols // 8
    assert (crop_labels[:, 1:3] == IGNORE).all()  # a crop does not show where it lies
    (target,) = [row for row in crop_labels if row[0] == 1 + NAMES.index((item.about[0].colour, item.about[0].shape))]
    assert GLYPHS[target[3]] == item.answer


def test_focus_pairs_point_the_region_and_the_answer_at_the_objects_tokens(tiny, item):
    model, tokenizer = tiny
    example = build_example(item, "region", tokenizer, max_pixels=DEMO_MAX_PIXELS)
    tokens, pad = example.input_ids.tolist(), tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    pads = [i for i, t in enumerate(tokens) if t == pad]
    n_global = int(example.image_grid_thw[0].prod()) // 4
    (obj,) = item.about
    name = 1 + NAMES.index((obj.colour, obj.shape))
    global_key = pads[int((example.token_labels[:n_global, 0] == name).nonzero())]
    crop_key = pads[n_global + int((example.token_labels[n_global:, 0] == name).nonzero())]
    predicted = {}
    for query, key, head in example.focus.tolist():
        assert head == 0
        predicted.setdefault(key, []).append(example.labels[query + 1].item())
    assert set(predicted) == {global_key, crop_key}
    assert tokenizer.decode(predicted[global_key], skip_special_tokens=False) == region_text(item.cells)
    assert tokenizer.decode(predicted[crop_key]) == item.answer
    block = block_reading_example(0, 3, tokenizer, max_pixels=DEMO_MAX_PIXELS)
    glyphs = [tokenizer.decode([block.labels[q + 1].item()]) for q, _, _ in block.focus.tolist()]
    assert "".join(glyphs).split() == [o.glyph for o in block_scene(0, 3)[1]]
    assert len(set(block.focus[:, 1].tolist())) == 9  # one token per object


@pytest.mark.parametrize("mode", ["direct", "region"])
def test_a_relation_focuses_one_head_on_each_object(tiny, mode):
    """Spatial answers: head 0 on the first named object, head 1 on the second (their mean says
    nothing), in the global view also after a crop (a model's crop may miss one of them)."""
    model, tokenizer = tiny
    (item,) = generate(0, 1, ("spatial",))
    example = build_example(item, mode, tokenizer, max_pixels=DEMO_MAX_PIXELS)
    assert len(example.image_grid_thw) == (2 if mode == "region" else 1)
    tokens, pad = example.input_ids.tolist(), tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    pads = [i for i, t in enumerate(tokens) if t == pad]
    names = [1 + NAMES.index((obj.colour, obj.shape)) for obj in item.about]
    n_global = int(example.image_grid_thw[0].prod()) // 4
    keys = [pads[int((example.token_labels[:n_global, 0] == name).nonzero())] for name in names]
    assert item.question.index(item.about[0].name) < item.question.index(item.about[1].name)
    answer = {(key, head) for query, key, head in example.focus.tolist()  # (region tokens: before the last image)
              if example.labels[query + 1] >= 0 and query > pads[-1]}
    assert answer == {(keys[0], 0), (keys[1], 1)}


def test_focus_loss_scores_each_head_on_its_own_keys():
    weights = torch.full((1, 4, 6, 6), 0.02)
    weights[0, 0, 5, 1] = weights[0, 1, 5, 2] = 0.9
    focus = torch.tensor([[0, 5, 1, 0], [0, 5, 2, 1]])
    right = focus_loss(weights, focus)
    assert right < 0.11 and focus_loss(weights, focus.flip(0)) == right
    swapped = focus.clone()
    swapped[:, 3] = 1 - swapped[:, 3]
    assert focus_loss(weights, swapped) > 3.5  # -log 0.02
    both = torch.tensor([[0, 5, 1, 0], [0, 5, 2, 0]])  # one head on two keys: their sum
    assert torch.isclose(focus_loss(weights, both), -torch.tensor(0.92).log())


def mixed_examples(tokenizer) -> list:
    items = generate(0, 6)
    modes = ["region", "reencode", "free", "direct", "reencode"]
    examples = [build_example(item, mode, tokenizer, max_pixels=DEMO_MAX_PIXELS) for item, mode in zip(items, modes)]
    return examples + [grounding_example(items[5], tokenizer, max_pixels=DEMO_MAX_PIXELS),
                       block_reading_example(0, 0, tokenizer, max_pixels=DEMO_MAX_PIXELS)]


def test_conversations_share_one_task_per_group():
    tokenizer = tiny_vpt_model(branches=("dino",))[1]
    data = Conversations(tokenizer, seed=0, length=4000, group=8)
    tasks = [data.task(i)[1] for i in range(4000)]
    assert all(len(set(tasks[i : i + 8])) == 1 for i in range(0, 4000, 8))
    assert all(abs(tasks.count(task) / 4000 - share) < 0.06 for task, share in TASKS.items())
    assert len({data.task(i)[0] for i in range(8)}) > 1  # families still vary within a group
    start = 8 * tasks[::8].index("block_view")  # the ViT alone: a vision-stage batch
    batch = collate([data[i] for i in range(start, start + 8)], model=None)
    assert set(batch) == {"pixel_values", "image_grid_thw", "token_labels"} and len(batch["image_grid_thw"]) == 8


def test_conversations_follow_the_family_mix():
    tokenizer = tiny_vpt_model(branches=("dino",))[1]
    data = Conversations(tokenizer, seed=0, length=400, families={"counting": 0.5, "spatial": 0.5})
    families = [data.task(i)[0] for i in range(400)]
    assert set(families) == {"counting", "spatial"} and abs(families.count("counting") / 400 - 0.5) < 0.1


def test_a_few_steps_lower_the_loss():
    """A batch of every task, two re-encoding rows among them at different offsets."""
    tokenizer = tiny_vpt_model(branches=("dino",))[1]
    torch.manual_seed(0)
    model = VPTForConditionalGeneration(demo_config(tokenizer, **TINY)).train()
    batch = collate(mixed_examples(tokenizer), model)
    assert batch["detection_images"] is not None and batch["detection_images"].shape[0] >= 2
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    model.set_attn_implementation("eager")
    head = TokenHead(model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    steps = [train_step(model, head, batch, optimizer) for _ in range(8)]
    assert set(steps[0]) >= {"loss", "focus", "name", "x", "y", "glyph", "name_acc", "glyph_acc"}
    assert steps[-1]["loss"] < 0.75 * steps[0]["loss"]
    assert steps[-1]["focus"] < 0.95 * steps[0]["focus"]  # the slowest: a lookup
    assert sum(steps[-1][k] for k in COLUMNS) < 0.75 * sum(steps[0][k] for k in COLUMNS)


@torch.no_grad()
def test_batched_rows_equal_their_unbatched_forwards():
    """Right padding, per-row positions and the action conditions (pass 1) do not mix rows."""
    tokenizer = tiny_vpt_model(branches=("dino",))[1]
    torch.manual_seed(0)
    model = VPTForConditionalGeneration(demo_config(tokenizer, **TINY)).eval()
    examples = mixed_examples(tokenizer)
    batched = model(**collate(examples, model)).logits
    for row, example in enumerate(examples):
        alone = model(**collate([example], model)).logits[0]
        torch.testing.assert_close(batched[row, : len(alone)], alone, rtol=1e-4, atol=1e-4)


def test_train_saves_a_bundle_and_resumes_exactly(tmp_path):
    """Two vision-stage steps, then three conversation steps; resumed inside the first stage and
    across the boundary, the weights end where a straight run's do."""
    common = dict(batch_size=2, device="cpu", workers=0, eval_every=0, eval_items=1, log_every=1,
                  warmup=3, vision_steps=2, config_overrides=TINY)  # split runs stop inside the warmup
    straight = tmp_path / "straight"
    result = train(TrainArgs(out=straight, steps=5, **common))
    assert set(result) >= {"region/fine_detail", "direct/fine_detail", "free/counting", "reencode/spatial",
                           "region/fine_detail_crop_hit"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "train_state.pt", "optimizer.pt", "log.jsonl"} <= {
        p.name for p in straight.iterdir()}
    model = VPTForConditionalGeneration.from_pretrained(straight)
    assert load_tokenizer(straight).get_vocab() == demo_tokenizer().get_vocab()

    split = tmp_path / "split"
    train(TrainArgs(out=split, steps=1, **common))
    train(TrainArgs(out=split, steps=3, resume=split, **common))
    train(TrainArgs(out=split, steps=5, resume=split, **common))
    resumed = VPTForConditionalGeneration.from_pretrained(split)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    log = [json.loads(line) for line in (split / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "name_loss" in r] == [1, 2, 3, 4, 5]
    conversations = [r["step"] for r in log if "loss" in r]  # the LLM's: none in the vision stage
    assert conversations and set(conversations) <= {3, 4, 5}  # (a "block_view" batch has none)

    (split / "optimizer.pt").unlink()  # a committed checkpoint leaves AdamW's moments behind
    train(TrainArgs(out=split, steps=7, resume=split, **common))
    lrs = [r["lr"] for r in (json.loads(line) for line in (split / "log.jsonl").read_text().splitlines())
           if r.get("step") in (6, 7) and "lr" in r]
    assert lrs == pytest.approx([TrainArgs.lr / 3, 2 * TrainArgs.lr / 3])  # fresh moments: warmed up again


CLIP_PIXELS = 448 * 448
"""The clip branch's budget in these tests: twice the demo's global view on each side."""


def reencoded_conversation(model, tokenizer, item, mode: str, branch: str) -> tuple[list[int], torch.Tensor]:
    """What the session holds for ``item`` asked in prompt ``mode`` and forced to re-encode with
    ``branch``, then to the answer; and the re-encoded features."""
    session = VPTSession(model, tokenizer)
    session.start([item.image], [build_question(item.question, mode)])
    session.generate(3, forced={0: ids(tokenizer, BRANCHES[branch].action_text)})
    features = branch_features(model, branch, [item.image])[0]
    session.add_reencode(0, branch, features)
    answer = ids(tokenizer, item.answer + IM_END)
    session.generate(len(answer), forced={0: answer})
    return session.conversation(0), features


def test_clip_reencoding_conversation_shows_the_whole_image_at_its_budget(item):
    """The reencode route on the clip branch: the session's layout token for token, one placeholder per
    merged token of the whole image within the clip budget (more than the global view's), labelled
    with the glyphs it is fine enough to show, and the answer focused on the object's placeholder."""
    model, tokenizer = tiny_vpt_model(branches=("dino", "clip"), seed=0, image_max_pixels=DEMO_MAX_PIXELS,
                                      clip_max_pixels=CLIP_PIXELS)
    example = build_example(item, "reencode", tokenizer, max_pixels=DEMO_MAX_PIXELS, branch="clip",
                            clip_max_pixels=CLIP_PIXELS)
    clip = BRANCHES["clip"]
    conversation, features = reencoded_conversation(model, tokenizer, item, "reencode", "clip")
    assert example.input_ids.tolist() == conversation
    assert example.detection_images is None
    placeholders = [i for i, t in enumerate(example.input_ids.tolist())
                    if t == tokenizer.convert_tokens_to_ids(clip.image_pad)]
    n_global = int(example.image_grid_thw[0].prod()) // 4
    assert len(placeholders) == len(features) == len(example.clip.token_labels) > 3 * n_global
    (obj,) = item.about
    (target,) = [k for k, row in enumerate(example.clip.token_labels)
                 if row[0] == 1 + NAMES.index((obj.colour, obj.shape))]
    assert GLYPHS[example.clip.token_labels[target, 3]] == item.answer
    assert (example.token_labels[:, 3] == IGNORE).all()  # the global view still shows no glyph
    assert {key for _, key, _ in example.focus.tolist()} == {placeholders[target]}


def test_clip_reencoding_counts_in_the_global_view():
    """Only a reading looks at the re-encoding: a counting answer after a clip re-encoding is focused
    on the counted objects' tokens in the global view, as the direct answer is."""
    _, tokenizer = tiny_vpt_model(branches=("dino", "clip"), seed=0)
    counting = next(item for item in generate(0, 8, ("counting",)) if len(item.about) > 1)
    example = build_example(counting, "reencode", tokenizer, max_pixels=DEMO_MAX_PIXELS, branch="clip",
                            clip_max_pixels=CLIP_PIXELS)
    direct = build_example(counting, "direct", tokenizer, max_pixels=DEMO_MAX_PIXELS)
    global_pads = [i for i, t in enumerate(example.input_ids.tolist())
                   if t == tokenizer.convert_tokens_to_ids(IMAGE_PAD)]
    keys = sorted({key for _, key, _ in example.focus.tolist()})
    assert keys and set(keys) <= set(global_pads)
    assert keys == sorted({key for _, key, _ in direct.focus.tolist()})  # the same tokens: the same prefix


def test_free_mode_counts_through_a_clip_reencoding():
    """On a clip model free mode re-encodes to count: the session's conversation token for token in
    the unsuffixed prompt; a free batch mixes it with a crop (fine_detail) and a direct answer
    (spatial), and trains on all three."""
    model, tokenizer = tiny_vpt_model(branches=("dino", "clip"), seed=0, image_max_pixels=DEMO_MAX_PIXELS,
                                      clip_max_pixels=CLIP_PIXELS)
    counting, reading, spatial = (generate(0, 1, (family,))[0] for family in ("counting", "fine_detail", "spatial"))
    examples = [build_example(item, "free", tokenizer, max_pixels=DEMO_MAX_PIXELS, branch="clip",
                              clip_max_pixels=CLIP_PIXELS) for item in (counting, reading, spatial)]
    assert examples[0].input_ids.tolist() == reencoded_conversation(model, tokenizer, counting, "free", "clip")[0]
    assert [len(e.image_grid_thw) for e in examples] == [1, 2, 1] and examples[2].clip is None

    batch = collate(examples, model)
    assert len(batch["clip_images_grid_thw"]) == 1 and batch["detection_images"] is None
    model.set_attn_implementation("eager")
    head = TokenHead(model.config.text_config.hidden_size)
    step = train_step(model.train(), head, batch, torch.optim.AdamW([*model.parameters(), *head.parameters()]))
    assert torch.isfinite(torch.as_tensor(step["loss"])).all()


def test_clip_reencoding_rows_train_the_vit_on_their_glyphs():
    """A batch of clip re-encoding conversations: the forward gets the clip views, `TokenHead` their
    labels after the images' (glyphs included), and a few steps lower the losses."""
    tokenizer = tiny_vpt_model(branches=("dino",))[1]
    torch.manual_seed(0)
    config = demo_config(tokenizer, **TINY, branches=("dino", "clip"), clip_max_pixels=CLIP_PIXELS)
    model = VPTForConditionalGeneration(config).train()
    data = Conversations(tokenizer, seed=0, length=64, max_pixels=DEMO_MAX_PIXELS, tasks={"reencode": 1.0},
                         branch="clip", clip_max_pixels=CLIP_PIXELS)
    batch = collate([data[i] for i in range(4)], model)
    assert batch["detection_images"] is None and len(batch["clip_images_grid_thw"]) == 4
    assert len(batch["clip_token_labels"]) == int(batch["clip_images_grid_thw"].prod(-1).sum()) // 4
    model.set_attn_implementation("eager")
    head = TokenHead(model.config.text_config.hidden_size)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-2)
    steps = [train_step(model, head, batch, optimizer) for _ in range(8)]
    assert "glyph" in steps[0]  # only the clip views label glyphs here
    assert steps[-1]["loss"] < 0.75 * steps[0]["loss"]
    assert steps[-1]["glyph"] < steps[0]["glyph"]


def test_init_starts_from_a_checkpoint_with_a_branch_added(tmp_path):
    """`init`: a trained checkpoint's weights and head under a changed config (a clip branch and its
    budget): every weight it had is kept, the new projector is added, and the result trains, saves
    and loads as a graph whose re-encoding mode runs the clip branch."""
    common = dict(batch_size=2, device="cpu", workers=0, eval_every=0, eval_items=1, log_every=1)
    first = tmp_path / "first"
    train(TrainArgs(out=first, steps=1, config_overrides=TINY, **common))
    grown = tmp_path / "grown"
    overrides = {"vision_encoder_ls": ["dino", "clip"], "clip_max_pixels": CLIP_PIXELS}
    train(TrainArgs(out=grown, steps=0, init=first, config_overrides=overrides, **common))
    before, after = (VPTForConditionalGeneration.from_pretrained(p) for p in (first, grown))
    assert after.config.branches == ("dino", "clip") and after.config.reencode_max_pixels == CLIP_PIXELS
    kept = after.state_dict()
    for name, value in before.state_dict().items():
        torch.testing.assert_close(kept[name], value, msg=name)
    assert any(name.startswith("clip_projector") for name in set(kept) - set(before.state_dict()))
    state = torch.load(grown / "train_state.pt", weights_only=True)
    assert state["step"] == 0
    torch.testing.assert_close(state["head"], torch.load(first / "train_state.pt", weights_only=True)["head"])
    train(TrainArgs(out=grown, steps=2, resume=grown, tasks={"reencode": 1.0}, **common))
    log = [json.loads(line) for line in (grown / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == [1, 2]

    from vpt_agent import build_graph
    graph = build_graph(str(grown))
    item = generate(5, 1, ("fine_detail",))[0]
    clip = BRANCHES["clip"]
    out = graph.invoke({"image": item.image, "q": item.question},
                       {"configurable": {"mode": "reencode", "force": [clip.action_text]}})
    (step,) = [step for step in out["steps"] if step["node"] == "clip"]  # (untrained: its answer may be empty)
    seen = qwen_pixel_values([item.image], max_pixels=CLIP_PIXELS)[1]
    assert step["error"] is None and step["feature_shape"][0] == int(seen.prod()) // 4


def test_minutes_stop_training_and_still_save(tmp_path):
    train(TrainArgs(out=tmp_path, steps=1000, minutes=1e-4, batch_size=1, device="cpu", workers=0,
                    eval_every=0, eval_items=1, config_overrides=TINY))
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert 1 <= state["step"] < 1000
    assert (tmp_path / "model.safetensors").is_file()


def test_run_minutes_stop_the_run_and_restart_its_schedule(tmp_path, monkeypatch):
    """A run with its own time limit warms up afresh (moments kept) and ends on time, its cosine over
    its own minutes whatever the step budget says. The trainer's clock is a fake one (each reading
    0.05 s later), so the test does not depend on the machine's speed."""
    common = dict(batch_size=1, device="cpu", workers=0, eval_every=0, eval_items=1, log_every=1, warmup=2,
                  config_overrides=TINY)
    train(TrainArgs(out=tmp_path, steps=3, **common))
    ticks = itertools.count()
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: next(ticks) * 0.05))
    train(TrainArgs(out=tmp_path, steps=10**6, run_minutes=0.05, resume=tmp_path, **common))
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in log if "lr" in r and r["step"] > 3]
    assert lrs[:2] == pytest.approx([TrainArgs.lr / 2, TrainArgs.lr])  # warmed up again
    assert 0.1 * TrainArgs.lr <= lrs[-1] < 0.5 * TrainArgs.lr  # the cosine ran its course in 3 s
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert 5 < state["step"] < 10**6
