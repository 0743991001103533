"""The demo's model builders (mergekit_aim.demo.models): sizes, saving, and a
training loop that lowers held-out loss, reproducibly."""

import pytest
import torch
from fixtures.tiny_models import tiny_model
from safetensors import safe_open

from mergekit_aim.demo import models
from mergekit_aim.tuning.evaluation import evaluate_loss


def test_sizes_divide_for_other_widths():
    for hidden in (48, 96, 128, 160, 192):
        model = models.tiny_llama(100, hidden_size=hidden, num_layers=1)
        logits = model(input_ids=torch.tensor([[1, 5, 6]])).logits
        assert logits.shape == (1, 3, 100)


def test_save_checkpoint_dtype_leaves_model_alone(tiny_tokenizer, tmp_path):
    model = models.tiny_llama(len(tiny_tokenizer))
    path = models.save_checkpoint(model, tiny_tokenizer, tmp_path, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.float32
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("lm_head.weight").dtype == torch.bfloat16


def test_training_reduces_loss_and_heldout_loss_is_deterministic(
    tiny_tokenizer, tiny_text
):
    train, heldout = tiny_text[:300], tiny_text[300:]
    model = models.tiny_llama(len(tiny_tokenizer), seed=0)

    def heldout_loss():
        return evaluate_loss(model, heldout, tokenizer=tiny_tokenizer, seq_len=64)

    before = heldout_loss()
    assert before == heldout_loss()
    losses = models.train_causal_lm(
        model, tiny_tokenizer, train, steps=30, seq_len=64, batch_size=8, seed=0
    )
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert not model.training
    after = heldout_loss()
    assert after == heldout_loss()
    assert after < before - 1.0
    assert sum(losses[-5:]) < sum(losses[:5])


def test_training_is_reproducible(tiny_tokenizer, tiny_text):
    runs = []
    for _ in range(2):
        model = tiny_model("gpt2", len(tiny_tokenizer), seed=3)
        runs.append(
            models.train_causal_lm(
                model, tiny_tokenizer, tiny_text, steps=3, seq_len=32, seed=5
            )
        )
    assert runs[0] == runs[1]


def test_too_little_text_is_an_error(tiny_tokenizer):
    model = models.tiny_llama(len(tiny_tokenizer))
    with pytest.raises(ValueError, match="seq_len=128"):
        models.train_causal_lm(model, tiny_tokenizer, ["A farmer."], steps=1)
