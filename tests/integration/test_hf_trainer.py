"""A real transformers.Trainer run (tiny GPT-2 from a config, CPU, no downloads) with
OtelTrainCallback exports the same train/*, eval/* and epoch/* keys at the same steps as a
plain PyTorch loop recording the same things."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from otel_train.integrations.hf import OtelTrainCallback  # noqa: E402
from otel_train.testing import CapturingExporter  # noqa: E402

pytestmark = pytest.mark.integration

SEQ_LEN, VOCAB, N_SAMPLES = 16, 64, 40
MICRO_BATCH, ACCUMULATION, MAX_STEPS, EVAL_EVERY = 2, 2, 20, 10
INTERVALS = {"train": 5, "perf": 10}


def _tiny_gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ_LEN
    )
    return transformers.GPT2LMHeadModel(config)


def _dataset(n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ_LEN), generator=generator)
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _exported_keys(capture: CapturingExporter) -> list[tuple[int | None, frozenset[str]]]:
    rows = []
    for row in capture.rows:
        keys = frozenset(k for k in row.values if k.startswith(("train/", "eval/", "epoch/")))
        keys -= {"train/global_step"}
        if keys:
            rows.append((row.step, keys))
    return rows


def _plain_loop(tel, train, evaluation) -> None:
    model = _tiny_gpt2()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    batches_per_epoch = N_SAMPLES // MICRO_BATCH
    cursor = 0
    for step in range(1, MAX_STEPS + 1):
        for _ in range(ACCUMULATION):
            chunk = train[cursor % N_SAMPLES : cursor % N_SAMPLES + MICRO_BATCH]
            cursor += MICRO_BATCH
            input_ids = torch.stack([s["input_ids"] for s in chunk])
            loss = model(input_ids=input_ids, labels=input_ids).loss / ACCUMULATION
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        epoch = cursor / MICRO_BATCH / batches_per_epoch
        tel.training.record(
            loss=loss.detach() * ACCUMULATION,
            learning_rate=5e-4,
            grad_norm=grad_norm,
            tokens=MICRO_BATCH * ACCUMULATION * SEQ_LEN,
            samples=MICRO_BATCH * ACCUMULATION,
            epoch=epoch,
        )
        tel.step(step)
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                ids = torch.stack([s["input_ids"] for s in evaluation])
                tel.evaluate(loss=model(input_ids=ids, labels=ids).loss)
        if epoch == math.floor(epoch):
            tel.end_epoch(round(epoch))


def test_trainer_callback_exports_the_same_keys_at_the_same_steps_as_a_plain_loop(
    telemetry_factory, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    train, evaluation = _dataset(N_SAMPLES, seed=1), _dataset(8, seed=2)

    plain_capture = CapturingExporter()
    plain = telemetry_factory(run="plain", exporters=[plain_capture], intervals=INTERVALS)
    _plain_loop(plain, train, evaluation)
    plain.flush()

    hf_capture = CapturingExporter()
    tel = telemetry_factory(run="hf", exporters=[hf_capture], intervals=INTERVALS)
    callback = OtelTrainCallback(tel)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        per_device_train_batch_size=MICRO_BATCH,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=ACCUMULATION,
        max_steps=MAX_STEPS,
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=EVAL_EVERY,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=_tiny_gpt2(),
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        callbacks=[callback],
    )
    trainer.train()
    tel.flush()

    hf_rows, plain_rows = _exported_keys(hf_capture), _exported_keys(plain_capture)
    assert hf_rows == plain_rows
    train_steps = [step for step, keys in hf_rows if "train/loss" in keys]
    assert train_steps == [5, 10, 15, 20]
    assert [step for step, keys in hf_rows if "eval/loss" in keys] == [10, 20]
    assert {"train/num_input_tokens_seen", "train/samples", "train/grad_norm"} <= hf_rows[0][1]
    # Tokens and samples are this rank's counts, cumulative, as the plain loop recorded them.
    assert hf_capture.values_of("train/num_input_tokens_seen") == plain_capture.values_of(
        "train/num_input_tokens_seen"
    )
    assert hf_capture.values_of("train/samples")[-1] == MAX_STEPS * MICRO_BATCH * ACCUMULATION
    assert hf_capture.values_of("train/learning_rate")[-1] == pytest.approx(5e-4)
    assert callback.effective_batch_size == MICRO_BATCH * ACCUMULATION
    # Each exported loss is the mean of the losses the Trainer logged since the previous export,
    # up to and including that very step (not the step before).
    logged = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    bounds = list(zip([0, *train_steps], train_steps, strict=False))
    means = [sum(logged[s] for s in range(lo + 1, hi + 1)) / (hi - lo) for lo, hi in bounds]
    assert hf_capture.values_of("train/loss") == pytest.approx(means)
    # The Trainer's eval loss arrived as eval/loss with its perplexity.
    hf_eval = hf_capture.values_of("eval/loss")
    assert hf_capture.values_of("eval/perplexity") == pytest.approx([math.exp(v) for v in hf_eval])
