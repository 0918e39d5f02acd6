"""Textual-inversion training (``train-adapter --type embedding``) on a tiny model: only the new vectors learn and the
loss on fixed draws falls, the vectors start as the init word's, a killed run resumes bit for bit, and the saved A1111
file, named in a prompt, gives the text conditioning the training used."""

from __future__ import annotations

import pytest
import torch
from helpers import TOY_F2, random_model, run_cli
from safetensors.torch import load_file

from nijimi.errors import ConfigError
from nijimi.io.checkpoint import save_single
from nijimi.io.embeddings import EmbeddingLibrary, read_embedding
from nijimi.pipelines.pipeline import Pipeline
from nijimi.train.adapter import AdapterTrainConfig
from nijimi.train.embedding import initial_vectors, prepare_embedding_training, train_embedding
from nijimi.train.trainer import step_generator


def config(tmp_path, **changes) -> AdapterTrainConfig:
    values = dict(type="embedding", out=str(tmp_path / "pink.safetensors"), data="shapes-pink", data_count=4,
                  steps=4, batch_size=2, lr=5e-2, warmup_steps=1, sample_every=0, save_every=0, min_snr_gamma=0.0,
                  init_word="red", vectors=2)
    return AdapterTrainConfig(**{**values, **changes})


def eval_loss(module, n: int = 6) -> float:
    module.eval()
    with torch.no_grad():
        return sum(float(module([0, 1, 2, 3], step_generator(123, k), slice(0, 4))) for k in range(n)) / n


def test_only_the_vectors_learn_and_the_saved_file_conditions_as_in_training(tmp_path):
    model = random_model(TOY_F2, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run = prepare_embedding_training(config(tmp_path, steps=10, batch_size=4), model)
    table = model.text_encoder.text_model.embeddings.token_embedding.weight
    red = model.config.tokenizer().encode("red")
    assert torch.equal(run.trainer.module.vectors, table[red * 2])
    assert [name for name, _ in run.trainer.module.named_parameters()] == ["vectors"]
    start = eval_loss(run.trainer.module)
    run.trainer.run()
    assert eval_loss(run.trainer.module) < start  # a random U-Net barely listens to its text: the loss falls a little
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    run.save(tmp_path / "pink.safetensors")
    saved = read_embedding(tmp_path / "pink.safetensors")
    assert torch.equal(saved, run.trainer.module.vectors.detach()) and not torch.equal(saved, table[red * 2])
    caption = "a small pink star at the top"
    with torch.no_grad():
        trained = run.trainer.module.objective.encode_captions([caption])
    library = EmbeddingLibrary(files=[tmp_path / "pink.safetensors"], width=model.config.text.width)
    conds = Pipeline(model).conditioner.step_conditioning(caption, "", 20, None, False, library)
    assert conds.embeddings == ["pink"] and torch.equal(conds.cond.at_step(0), trained[0])


def test_resume_continues_bit_for_bit(tmp_path):
    whole = train_embedding(config(tmp_path / "a"), model=random_model(TOY_F2, 0))
    cfg = config(tmp_path / "b", save_every=2)
    first = prepare_embedding_training(cfg, random_model(TOY_F2, 0))
    first.trainer.run(until=2)
    resumed = train_embedding(cfg, resume=True, model=random_model(TOY_F2, 0))
    assert resumed.trainer.step == 4
    assert torch.equal(load_file(tmp_path / "a" / "pink.safetensors")["emb_params"],
                       load_file(tmp_path / "b" / "pink.safetensors")["emb_params"])
    assert whole.trainer.losses == resumed.trainer.losses


def test_initial_vectors_repeat_the_init_words_tokens():
    model = random_model(TOY_F2, 0)
    tokenizer, table = model.config.tokenizer(), model.text_encoder.text_model.embeddings.token_embedding.weight
    ids = tokenizer.encode("pink star")
    assert torch.equal(initial_vectors(model, tokenizer, "pink star", 3), table[[ids[0], ids[1], ids[0]]])
    with pytest.raises(ConfigError, match="init word ' ' has no tokens"):
        initial_vectors(model, tokenizer, " ", 1)


@pytest.mark.parametrize(("changes", "message"), [
    ({"out": "{tmp}/blue.safetensors"}, "no caption of shapes-pink \\(of the first 16\\) names the embedding 'blue'"),
    ({"format": "peft"}, "textual inversion is --type embedding, saved in kohya's \\(A1111's\\) format"),
    ({"vectors": 0}, "an embedding needs vectors ≥ 1 and an init word, got 0"),
])
def test_user_errors(tmp_path, changes, message):
    changes = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in changes.items()}
    with pytest.raises(ConfigError, match=message):
        prepare_embedding_training(config(tmp_path, **changes), random_model(TOY_F2, 0))


def test_the_command_writes_an_embedding(capsys, tmp_path):
    save_single(random_model(TOY_F2, 0), tmp_path / "base.safetensors")
    out = tmp_path / "pink.safetensors"
    code, stdout, err = run_cli(capsys, "train-adapter", "--type", "embedding", "--base", tmp_path / "base.safetensors",
                                "--data", "shapes-pink", "--data-count=4", "--steps", "2", "--batch-size", "2",
                                "--vectors", "3", "--init-word", "red", "--sample-every", "2", "--sample-steps", "2",
                                "--out", out, "--quiet")
    assert (code, stdout, err) == (0, f"{out}\n", "")
    assert read_embedding(out).shape == (3, TOY_F2.text.width)
    assert (tmp_path / "pink-train" / "samples-000002.png").is_file()
