"""Write real gradients of a tiny character-level LSTM, from the step where they explode.

The model reads the Zen of Python (shipped with CPython, so nothing is downloaded) and is trained
with plain SGD at a learning rate that is too high and no clipping, which is how gradient
explosions in RNNs usually happen.  The gradients of the step with the largest global norm are
saved as .npz, .safetensors (float32 and a bfloat16 copy), HDF5 and a PyTorch checkpoint
(``torch.save`` of the gradients by parameter name).

A second, smaller model (three stacked one-layer LSTMs, ``layers.0`` to ``layers.2``, between an
embedding and a head) is trained with a learning rate warmed up linearly from 1 to a peak that
is too high; the gradients of each of its first RUN_STEPS steps, around the step where they
explode, are saved in run/ (one safetensors file a step, the step in its metadata), for
``gclip history sample_data/run/ --by-layer``.

    pip install torch==2.13.0 safetensors h5py ml_dtypes numpy
    python sample_data/make_sample_data.py

Reruns give the same values bit for bit (seeded, one thread); only the order of the keys in
the safetensors ``__metadata__`` may change, as the safetensors library stores it in a hash map.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
from pathlib import Path

import h5py
import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
STEPS = 60
SEQUENCE = 120
BATCH = 16
LEARNING_RATE = 10.0  # too high on purpose: the gradients explode within 20 steps
RUN_STEPS = 12  # the run's dumps: steps 0 to 11 (about 32 KB each)
RUN_WARMUP = 30  # steps over which its learning rate rises ...
RUN_PEAK = 80.0  # ... from 1 to this: the gradients explode at step 6, at a rate near 17


def zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this
    return codecs.decode(this.s, "rot13")


class CharLSTM(torch.nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 32)
        self.lstm = torch.nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(128, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embed(tokens))
        return self.head(hidden)


def batches(ids: torch.Tensor, generator: torch.Generator):
    while True:
        starts = torch.randint(0, len(ids) - SEQUENCE - 1, (BATCH,), generator=generator)
        window = torch.stack([ids[s : s + SEQUENCE + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def train() -> tuple[int, float, float, list[float], dict[str, np.ndarray]]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text = zen_of_python()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    model = CharLSTM(len(vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    data = batches(ids, torch.Generator().manual_seed(1))
    norms, worst = [], (-1.0, 0, 0.0, {})
    for step in range(STEPS):
        inputs, targets = next(data)
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad.detach().double() for n, p in model.named_parameters()}
        norm = float(torch.sqrt(sum((g * g).sum() for g in grads.values())))
        norms.append(norm)
        if norm > worst[0]:
            worst = (norm, step, loss.item(), {n: g.float().numpy() for n, g in grads.items()})
        optimizer.step()
    norm, step, loss, grads = worst
    return step, loss, norm, norms, grads


class StackedLSTM(torch.nn.Module):
    """Three one-layer LSTMs one after the other, so that each is a layer of its own name."""

    def __init__(self, vocab: int, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(
            torch.nn.LSTM(width, width, batch_first=True) for _ in range(depth)
        )
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        for layer in self.layers:
            hidden, _ = layer(hidden)
        return self.head(hidden)


def train_run() -> list[tuple[float, dict[str, np.ndarray]]]:
    """The loss and gradients of each of the stacked model's first RUN_STEPS steps."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    text = zen_of_python()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    model = StackedLSTM(len(vocab))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = batches(ids, torch.Generator().manual_seed(1))
    steps = []
    for step in range(RUN_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = 1.0 + (RUN_PEAK - 1.0) * min(1.0, step / RUN_WARMUP)
        inputs, targets = next(data)
        loss = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        steps.append(
            (loss.item(), {n: p.grad.detach().numpy().copy() for n, p in model.named_parameters()})
        )
        optimizer.step()
    return steps


def write_run() -> None:
    folder = HERE / "run"
    folder.mkdir(exist_ok=True)
    for step, (loss, grads) in enumerate(train_run()):
        meta = {"step": str(step), "loss": f"{loss:.6f}", "model": "3 stacked LSTMs, hidden 16",
                "source": "sample_data/make_sample_data.py"}
        save_file(grads, str(folder / f"grads_step{step:02d}.safetensors"), metadata=meta)
    print(f"{RUN_STEPS} steps of the stacked LSTM -> run/")


def main() -> None:
    write_run()
    step, loss, norm, norms, grads = train()
    stem = HERE / f"lstm_grads_step{step}"
    meta = {"step": str(step), "loss": f"{loss:.6f}", "model": "2-layer char LSTM, hidden 128",
            "source": "sample_data/make_sample_data.py"}
    save_file(grads, f"{stem}.safetensors", metadata=meta)
    bf16 = {name: values.astype(ml_dtypes.bfloat16) for name, values in grads.items()}
    save_file(bf16, f"{stem}_bf16.safetensors", metadata=meta | {"dtype": "bfloat16"})
    np.savez(f"{stem}.npz", **grads, step=np.array(step, dtype=np.int64))
    torch.save({name: torch.from_numpy(values) for name, values in grads.items()}, f"{stem}.pt")
    with h5py.File(f"{stem}.h5", "w") as f:
        f.attrs.update(meta)
        for name, values in grads.items():
            f.create_dataset(name, data=values)
        f.create_dataset("step", data=np.int64(step))
    (HERE / "norms.json").write_text(json.dumps({"global_norm_per_step": norms}, indent=1) + "\n")
    print(f"step {step}: loss {loss:.3f}, global norm {norm:.4g}; median norm "
          f"{float(np.median(norms)):.4g} over {STEPS} steps -> {stem.name}.*")


if __name__ == "__main__":
    main()
