"""Write real gradients of a tiny character-level LSTM, from the step where they explode.

The model reads the Zen of Python (shipped with CPython, so nothing is downloaded) and is trained
with plain SGD at a learning rate that is too high and no clipping, which is how gradient
explosions in RNNs usually happen.  The gradients of the step with the largest global norm are
saved as .npz, .safetensors (float32 and a bfloat16 copy), HDF5 and a PyTorch checkpoint
(``torch.save`` of the gradients by parameter name).

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


def main() -> None:
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
