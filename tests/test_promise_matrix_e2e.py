"""The promise matrix, end-to-end half: real `dist-train train` processes on a sampled subset of setups.

The matrix (axes): training-set size (37, 48, 50, 64: divisible or not by batch x ranks x
accumulation), validation-set size (23, 29, 31, 37), per-process batch, `grad_accum_steps` 1/2/3,
world size 1/2/3 (gloo on CPU), the user's DataLoader shuffling or not, a per-sample map-style
Dataset or an in-memory TensorDataset (the fast path), a model with buffers and dropout (BatchNorm)
or one with tied parameters (an embedding and the output head share a weight), AdamW or SGD with
momentum, and the seed. Every sample carries its id as the last input column; the model writes the
ids it trains on to `$IDS_DIR/rank{RANK}.txt`, one line per micro-batch.

Whole runs cost seconds each, so the file draws a few setups per promise with `random.Random` and a
fixed seed, and reuses one uninterrupted run for several checks. Every test id carries the matrix
seed and its setup (`M<seed>:...`), and the file prints both, so a failure replays:

    DIST_TRAIN_MATRIX_SEED=7 DIST_TRAIN_MATRIX_SIZE=6 python -m pytest tests/test_promise_matrix_e2e.py

`DIST_TRAIN_MATRIX_SIZE` (default 2) is the number of resume setups drawn (their world sizes cycle
1, 2, 3, so the default costs the same for every seed); the world-size group draws SIZE - 1 setups
(at least one). The default sample is 18 runs: 9 of them on 1 process, 6 on 2, 3 on 3.

Promises:
1. interrupted + resumed == uninterrupted, bitwise, at an epoch's last step, the final step and a
   mid-epoch step, on the same world size; and, on another world size at the same global batch,
   equal to rounding with each sample once per epoch (the exact tail: no padding); and, on another
   step size (batch and accumulation), each remaining epoch once, the run as long as that takes and its
   lr schedule spread over it (issue 19);
2. `epochs=1`, then `epochs=2` in the same output_dir == a straight `epochs=2` run, bitwise;
3. (batch b, accumulation a) == (batch a*b, accumulation 1) on uneven data, same number of steps;
4. N ranks == 1 rank at the same global batch (N = 2 and 3), and they train on the same samples;
5. every logged `val_loss` is the exact per-sample mean over the whole validation set (which
   batch x ranks never divides), on 1, 2 and 3 ranks. Instead of freezing the weights with `lr=0`,
   every run saves a checkpoint at every step (`checkpoint_every=1`), so each validation is checked
   against the weights of its own step, buffers included, at no extra run.

Promises 3, 4 and cross-world resumes need a model whose per-sample outputs do not depend on how a
batch is cut: BatchNorm's batch statistics and dropout's masks do, so that group uses the tied model.
This matrix found two gaps, both fixed since: a resume on 3+ ranks was not bitwise (DDP rebuilt its
gradient buckets after the first backward: `accelerate_internals.fix_ddp_bucket_order`), and the
validation record's train_loss forgot the micro-batches before a mid-epoch resume (`TrainState.open_losses`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import MATRIX_SEED, assert_weights_equal, import_file, load_weights, read_ids, read_metrics, run_clis, val_records

MATRIX_SIZE = max(1, int(os.environ.get("DIST_TRAIN_MATRIX_SIZE", "2")))

TRAIN_SIZES = (37, 48, 50, 64)
VAL_SIZES = (23, 29, 31, 37)  # primes: no per-process batch (>= 2) x ranks divides them

PROJECT = '''
"""A user project for the promise matrix: sizes, dataset kind and shuffling come from data_args."""
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

FEATURES, CLASSES = 6, 5


def tensors(size, train):
    """Inputs [features..., token, id] and labels; the same on every call and in every process."""
    w = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1 if train else 2)
    features = torch.randn(size, FEATURES, generator=g)
    token = torch.randint(0, CLASSES, (size,), generator=g)
    y = (features @ w + 1.5 * nn.functional.one_hot(token, CLASSES)).argmax(dim=1)
    x = torch.cat([features, token.unsqueeze(1).float(), torch.arange(size).unsqueeze(1).float()], dim=1)
    return x, y


class PerSample(Dataset):
    """A map-style Dataset read one sample at a time (the regular, non-fast path)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


def get_dataloader(cfg, train):
    x, y = tensors(cfg.train_size if train else cfg.val_size, train)
    dataset = TensorDataset(x, y) if cfg.tensor_dataset else PerSample(x, y)
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=train and cfg.shuffle, num_workers=cfg.num_workers)


def log_ids(module, x):
    """One line per training micro-batch; an empty one for a stand-in (eval mode, with gradients: a rank with no
    sample in an epoch's short last step), so that line k is micro-batch k on every rank."""
    if os.environ.get("IDS_DIR") and (module.training or torch.is_grad_enabled()):
        with open(os.path.join(os.environ["IDS_DIR"], "rank" + os.environ.get("RANK", "0") + ".txt"), "a") as f:
            f.write((" ".join(str(int(i)) for i in x[:, -1].tolist()) if module.training else "") + "\\n")


class BNDropout(nn.Module):
    """Buffers (BatchNorm's running statistics) and dropout (the torch RNG): a resume restores both."""

    def __init__(self, hidden=16):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES + 1, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(hidden, CLASSES)

    def forward(self, x):
        log_ids(self, x)
        return self.fc2(self.drop(torch.tanh(self.bn(self.fc1(x[:, :-1])))))


class Tied(nn.Module):
    """The token's embedding and the output head are one weight (used twice per forward)."""

    def __init__(self, hidden=8):
        super().__init__()
        self.fc = nn.Linear(FEATURES, hidden)
        self.embed = nn.Embedding(CLASSES, hidden)
        self.head = nn.Linear(hidden, CLASSES, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        log_ids(self, x)
        return self.head(torch.tanh(self.fc(x[:, :FEATURES]) + self.embed(x[:, FEATURES].long())))
'''

MODELS = {"bn_dropout": "BNDropout", "tied": "Tied"}


@dataclasses.dataclass(frozen=True)
class Setup:
    train_size: int
    val_size: int
    batch_size: int  # per process
    grad_accum_steps: int
    world_size: int
    shuffle: bool
    tensor_dataset: bool  # in-memory TensorDataset (fast path) or a per-sample Dataset
    model: str
    optimizer: str
    seed: int
    epochs: int = 2
    lr: float = 0.05

    @property
    def micro_batch_samples(self) -> int:
        return self.batch_size * self.world_size

    @property
    def step_samples(self) -> int:
        return self.micro_batch_samples * self.grad_accum_steps

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.train_size / self.step_samples)

    @property
    def epoch_samples(self) -> int:  # every sample once, the last step short (dist_train/data/epoch.py)
        return self.train_size

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches (lines of a rank's id log) before optimizer step `step`: an epoch's short last step has fewer."""
        epoch, into = divmod(step, self.steps_per_epoch)
        return epoch * math.ceil(self.train_size / self.micro_batch_samples) + into * self.grad_accum_steps

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def on(self, **changes) -> Setup:
        return dataclasses.replace(self, **changes)

    def __str__(self) -> str:
        return (
            f"n{self.train_size}-v{self.val_size}-b{self.batch_size}-a{self.grad_accum_steps}-w{self.world_size}-"
            f"{'shuffle' if self.shuffle else 'ordered'}-{'tensors' if self.tensor_dataset else 'per_sample'}-"
            f"{self.model}-{self.optimizer}-s{self.seed}-e{self.epochs}"
        )

    def args(self, project: Path, output_dir: Path, *extra: str) -> list[str]:
        data_args = (
            f"{{train_size: {self.train_size}, val_size: {self.val_size}, "
            f"tensor_dataset: {str(self.tensor_dataset).lower()}, shuffle: {str(self.shuffle).lower()}}}"
        )
        optimizer = ["optimizer=sgd", "momentum=0.9"] if self.optimizer == "sgd" else [f"optimizer={self.optimizer}"]
        resume = [] if any(a.startswith("resume=") for a in extra) else ["resume=never"]
        return [
            f"model={project}:{MODELS[self.model]}",
            f"data={project}:get_dataloader",
            f"data_args={data_args}",
            *optimizer,
            f"lr={self.lr}",
            f"epochs={self.epochs}",
            f"batch_size={self.batch_size}",
            f"grad_accum_steps={self.grad_accum_steps}",
            f"seed={self.seed}",
            f"output_dir={output_dir}",
            "progress=false",
            "plot=false",
            "log_every=1",
            "checkpoint_every=1",
            *resume,
            *extra,
        ]


# ---- the sample -----------------------------------------------------------------------------------------


class NotBitwise(AssertionError):
    """Weights that differ, by however little."""


def _draw_resume_setup(rng: random.Random, world_size: int, model: str) -> Setup:
    """At least 3 steps per epoch, so that an epoch's last step, a mid-epoch step and the end differ."""
    while True:
        setup = Setup(
            train_size=rng.choice(TRAIN_SIZES),
            val_size=rng.choice(VAL_SIZES),
            batch_size=rng.choice((2, 3, 4, 5)),
            grad_accum_steps=rng.choice((1, 2, 3)),
            world_size=world_size,
            shuffle=rng.random() < 0.5,
            tensor_dataset=rng.random() < 0.5,
            model=model,
            optimizer=rng.choice(("adamw", "sgd")),
            seed=rng.randrange(1000),
        )
        if setup.steps_per_epoch >= 3:
            return setup


def _resume_points(rng: random.Random, setup: Setup) -> list[tuple[int, str]]:
    spe = setup.steps_per_epoch
    mid = rng.choice([k for k in range(1, setup.total_steps) if k % spe])
    return [(spe, "epoch0_end"), (setup.total_steps, "final"), (mid, f"mid_epoch{mid // spe}")]


def _draw_world_size_setup(rng: random.Random) -> tuple[Setup, int, int]:
    """The tied (per-sample) model at a global micro-batch g that 1, 2 and 3 ranks share, accumulation 2 or 3,
    on a training set that whole big batches (g x a) do not divide; two mid-epoch resume points."""
    while True:
        global_batch, accum = rng.choice((6, 12)), rng.choice((2, 3))
        train_size = rng.choice(TRAIN_SIZES)
        if train_size % (global_batch * accum):
            break
    setup = Setup(
        train_size=train_size,
        val_size=rng.choice(VAL_SIZES),
        batch_size=global_batch,
        grad_accum_steps=accum,
        world_size=1,
        shuffle=rng.random() < 0.5,
        tensor_dataset=rng.random() < 0.5,
        model="tied",
        optimizer="sgd",
        seed=rng.randrange(1000),
        lr=0.2,
    )
    mids = [k for k in range(1, setup.total_steps) if k % setup.steps_per_epoch]
    return setup, rng.choice(mids), rng.choice(mids)


_rng = random.Random(f"{MATRIX_SEED}/resume")
_first_model = _rng.randrange(len(MODELS))  # world sizes and models alternate: the default sample has both models
RESUME_SETUPS = [_draw_resume_setup(_rng, (1, 2, 3)[i % 3], sorted(MODELS)[(_first_model + i) % len(MODELS)]) for i in range(MATRIX_SIZE)]
RESUME_CASES = [(i, k, what) for i, setup in enumerate(RESUME_SETUPS) for k, what in _resume_points(_rng, setup)]
_rng = random.Random(f"{MATRIX_SEED}/world_size")
WORLD_SIZE_SETUPS = [_draw_world_size_setup(_rng) for _ in range(max(1, MATRIX_SIZE - 1))]
del _rng, _first_model


def _id(group: str, i: int, setup: Setup, *more) -> str:
    return ":".join([f"M{MATRIX_SEED}", f"{group}{i}", str(setup), *map(str, more)])


@pytest.fixture(scope="module", autouse=True)
def _announce(request):
    """The seed and every sampled setup, printed even without -s: a failure replays from them."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\npromise matrix e2e: DIST_TRAIN_MATRIX_SEED={MATRIX_SEED} DIST_TRAIN_MATRIX_SIZE={MATRIX_SIZE}")
        for i, setup in enumerate(RESUME_SETUPS):
            print(f"  resume R{i}: {setup} at steps {[k for j, k, _ in RESUME_CASES if j == i]}")
        print(f"  resize: R{RESIZE[0]} from step {RESIZE[1]} to batch_size {RESIZE[2]}, grad_accum_steps {RESIZE[3]}")
        for i, (setup, k1, k3) in enumerate(WORLD_SIZE_SETUPS):
            print(
                f"  world size W{i}: {setup} (global micro-batch {setup.batch_size}); resumes at steps {k1} (2 -> 1 ranks), {k3} (2 -> 3 and 3 -> 3)"
            )
    yield


# ---- runs, each made once and shared by the tests that check it ------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("matrix_project") / "matrix_project.py"
    path.write_text(textwrap.dedent(PROJECT))
    return path


@pytest.fixture(scope="module")
def project_module(project):
    """The project imported here (conftest drops it afterwards), for the exact validation loss."""
    return import_file(project, "promise_matrix_project")


@dataclasses.dataclass
class Run:
    out: Path
    ids: dict[int, list[list[int]]]  # rank -> the ids of each micro-batch it trained on, in order
    stdout: str

    def sequence(self) -> list[int]:
        """The global order: micro-batch k of rank 0, then of rank 1, ... (how dist_train deals)."""
        return [i for k in range(len(self.ids[0])) for rank in sorted(self.ids) for i in self.ids[rank][k]]


class Runs:
    """Cache of real CLI runs, keyed by name; each is made the first time a test asks for it."""

    def __init__(self, root: Path, project: Path):
        self.root, self.project, self._done = root, project, {}

    def get(self, name: str, setup: Setup, *extra: str, out: Path | None = None) -> Run:
        return self.get_all((name, setup, *extra), out=out)[0]

    def get_all(self, *runs: tuple, out: Path | None = None) -> list[Run]:
        """Each (name, setup, *extra) run; those not made yet are made at the same time (independent runs:
        one-thread processes, which leave cores idle one at a time)."""
        missing = {}
        for name, setup, *extra in runs:
            if name not in self._done and name not in missing:
                run_out = out or self.root / name / "run"
                ids_dir = self.root / name / "ids"
                ids_dir.mkdir(parents=True, exist_ok=True)
                missing[name] = (run_out, ids_dir, setup.args(self.project, run_out, *extra), setup.world_size)
        if missing:
            results = run_clis(
                *({"args": args, "nproc": nproc, "env": {"IDS_DIR": str(ids_dir)}} for _, ids_dir, args, nproc in missing.values())
            )
            for (name, (run_out, ids_dir, _, _)), result in zip(missing.items(), results):
                self._done[name] = Run(run_out, read_ids(ids_dir), result.stdout)
        return [self._done[name] for name, *_ in runs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, project) -> Runs:
    return Runs(tmp_path_factory.mktemp("matrix_runs"), project)


# ---- oracles ----------------------------------------------------------------------------------------


def assert_bitwise(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    differ = {
        name: (got[name].double() - want[name].double()).abs().max().item() for name in want if not torch.equal(got[name], want[name])
    }
    if differ:
        raise NotBitwise(f"not bitwise equal (max abs difference per tensor): {differ}")


def assert_each_id_once(epoch: list[int], train_size: int, step_samples: int) -> None:
    """Each id once, nothing more: no padding (the exact tail)."""
    assert sorted(epoch) == list(range(train_size)), "an id missing or seen twice"


def exact_val(module, setup: Setup, weights: dict) -> tuple[float, float]:
    """Mean per-sample cross-entropy and accuracy over the whole validation set, from `weights`, in one process."""
    model = getattr(module, MODELS[setup.model])()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) <= {"head.weight"} and not unexpected  # safetensors keeps one name per tied group
    model.eval()
    x, y = module.tensors(setup.val_size, False)
    with torch.no_grad():
        logits = model(x)
    return F.cross_entropy(logits, y, reduction="none").double().mean().item(), (logits.argmax(dim=1) == y).double().mean().item()


def checkpoint(run: Run, step: int) -> Path:
    return run.out / "checkpoints" / f"step_{step:08d}"


# ---- 1 and 2. same world size: interrupted + resumed is the uninterrupted run, bitwise ------------------


def _reference(runs: Runs, i: int) -> Run:
    return runs.get(f"R{i}", RESUME_SETUPS[i])


@pytest.mark.parametrize("i", range(len(RESUME_SETUPS)), ids=[_id("R", i, s) for i, s in enumerate(RESUME_SETUPS)])
def test_uninterrupted_run_deals_every_epoch_once(runs, i):
    setup = RESUME_SETUPS[i]
    run = _reference(runs, i)
    sequence = run.sequence()
    assert len(sequence) == setup.epochs * setup.epoch_samples
    epochs = [sequence[e * setup.epoch_samples : (e + 1) * setup.epoch_samples] for e in range(setup.epochs)]
    for epoch in epochs:
        assert_each_id_once(epoch, setup.train_size, setup.step_samples)
        if not setup.shuffle:
            assert epoch[: setup.train_size] == list(range(setup.train_size))
    if setup.shuffle:
        assert epochs[0] != epochs[1], "shuffle=True but both epochs in the same order"
    assert [r["step"] for r in read_metrics(run.out) if "val_loss" not in r] == list(range(1, setup.total_steps + 1))


def _resume_case(i: int, k: int, what: str):
    setup = RESUME_SETUPS[i]
    marks = []
    return pytest.param(i, k, what, marks=marks, id=_id("R", i, setup, f"k{k}", what))


@pytest.mark.parametrize("i,k,what", [_resume_case(*case) for case in RESUME_CASES])
def test_resumed_run_is_bitwise_the_uninterrupted_one(runs, i, k, what):
    setup = RESUME_SETUPS[i]
    reference = _reference(runs, i)
    resumed = _resumed(runs, i, reference)[k]
    if k == setup.total_steps:
        assert "nothing to train" in resumed.stdout and not resumed.ids
    else:
        epoch, into = divmod(k, setup.steps_per_epoch)
        assert f"at optimizer step {k} (epoch {epoch}, {into * setup.step_samples} samples into it" in resumed.stdout
        # It trains on exactly the rest of what the uninterrupted run trained on, in the same micro-batches.
        micro_steps = setup.micro_batches_before(k)
        assert resumed.ids == {rank: batches[micro_steps:] for rank, batches in reference.ids.items()}
    assert_bitwise(load_weights(resumed.out), load_weights(reference.out))
    # The validations after the resume report the same values as the uninterrupted run's (train_loss within
    # rounding: its open sums are carried as a mean over ranks, see the test below); a resume at the final step
    # has nothing to train or validate.
    without_train_loss = lambda r: {key: v for key, v in r.items() if key != "train_loss"}
    after = [without_train_loss(r) for r in val_records(reference.out) if r["step"] > k]
    assert [without_train_loss(r) for r in val_records(resumed.out)] == after


def _resumed(runs: Runs, i: int, reference: Run) -> dict[int, Run]:
    """Step k -> the run resumed from the reference's checkpoint of step k; every resume point of setup i is
    made at the first request, at the same time."""
    points = [k for j, k, _ in RESUME_CASES if j == i]
    made = runs.get_all(*((f"R{i}-from{k}", RESUME_SETUPS[i], f"resume={checkpoint(reference, k)}") for k in points))
    return dict(zip(points, made))


MID_EPOCH_CASE = next((i, k) for i, k, what in RESUME_CASES if what.startswith("mid_epoch"))


@pytest.mark.parametrize(
    "i,k", [MID_EPOCH_CASE], ids=[_id("R", MID_EPOCH_CASE[0], RESUME_SETUPS[MID_EPOCH_CASE[0]], f"k{MID_EPOCH_CASE[1]}")]
)
def test_resumed_runs_validation_record_has_the_epochs_train_loss(runs, i, k):
    reference = _reference(runs, i)
    resumed = _resumed(runs, i, reference)[k]
    want = {r["step"]: r["train_loss"] for r in val_records(reference.out)}
    for record in val_records(resumed.out):
        assert record["train_loss"] == pytest.approx(want[record["step"]], rel=1e-6), record["step"]


@pytest.mark.parametrize("i", [0], ids=[_id("R", 0, RESUME_SETUPS[0], "epochs1then2")])
def test_continuing_with_more_epochs_is_the_straight_run(runs, tmp_path, i):
    """`epochs=1`, then `epochs=2` (resume: auto) in the same output_dir: the straight run's weights, bitwise."""
    setup = RESUME_SETUPS[i]  # world size 1, the cheapest
    out = tmp_path / "continued"
    first = runs.get("R0-epochs1", setup.on(epochs=1), out=out)
    assert not first.stdout.count("resumed from")
    continued = runs.get("R0-epochs2", setup, "resume=auto", out=out)
    assert "resume: epochs: 1 -> 2" in continued.stdout
    assert_bitwise(load_weights(out), load_weights(_reference(runs, i).out))
    spe = setup.steps_per_epoch
    assert [r["step"] for r in val_records(out)] == [spe, 2 * spe]
    assert [r["step"] for r in read_metrics(out) if "val_loss" not in r] == list(range(1, 2 * spe + 1))


# ---- 1 (another step size): a mid-epoch resume with another batch and accumulation -------------------------


def _draw_resize(rng: random.Random) -> tuple[int, int, int, int]:
    """(setup index, mid-epoch step k, new batch_size, new grad_accum_steps): the resume setup with the most
    ranks, at its mid-epoch resume point, continued at another optimizer step whose micro-batch divides the position."""
    i = max(range(len(RESUME_SETUPS)), key=lambda j: RESUME_SETUPS[j].world_size)
    setup = RESUME_SETUPS[i]
    k = next(k for j, k, what in RESUME_CASES if j == i and what.startswith("mid_epoch"))
    consumed = k % setup.steps_per_epoch * setup.step_samples
    choices = [
        (b, a)
        for b in (2, 3, 4, 5)
        for a in (1, 2, 3)
        if consumed % (b * setup.world_size) == 0 and b * a != setup.batch_size * setup.grad_accum_steps
    ]
    return (i, k, *rng.choice(choices))


RESIZE = _draw_resize(random.Random(f"{MATRIX_SEED}/resize"))


def _resize_id() -> str:
    i, k, batch_size, accum = RESIZE
    return _id("R", i, RESUME_SETUPS[i], f"k{k}", f"to-b{batch_size}-a{accum}")


@pytest.mark.parametrize("case", [RESIZE], ids=[_resize_id()])
def test_a_resume_with_another_step_trains_each_remaining_epoch_once(runs, case):
    """Issue 19: the run's length and lr schedule come from where it stands. Saved mid-epoch, continued at
    another (batch, accumulation) with a linear schedule: the rest of that epoch and every later epoch each
    hold every id once (the last step of each short, none padded), the run takes exactly those
    steps, and the linear decay spans them."""
    i, k, batch_size, accum = case
    setup = RESUME_SETUPS[i]
    new = setup.on(batch_size=batch_size, grad_accum_steps=accum)
    reference = _reference(runs, i)
    resumed = runs.get(f"R{i}-resized-from{k}", new, f"resume={checkpoint(reference, k)}", "lr_schedule=linear")
    epoch, into = divmod(k, setup.steps_per_epoch)
    consumed = into * setup.step_samples
    rest = math.ceil((setup.train_size - consumed) / new.step_samples)  # steps left in the interrupted epoch
    total = k + rest + (setup.epochs - epoch - 1) * new.steps_per_epoch
    if total != setup.total_steps:  # the length (and so the schedule) said once when it is not the checkpoint's
        assert f"{total - k} optimizer steps remain, {total} in all (the checkpoint's run planned {setup.total_steps})" in resumed.stdout
    else:
        assert "the run's length is recomputed" not in resumed.stdout
    before = reference.sequence()[epoch * setup.epoch_samples : epoch * setup.epoch_samples + consumed]
    after = resumed.sequence()
    interrupted = before + after[: setup.train_size - consumed]
    assert_each_id_once(interrupted, setup.train_size, new.step_samples)
    later = after[setup.train_size - consumed :]
    assert len(later) == (setup.epochs - epoch - 1) * new.epoch_samples
    for e in range(setup.epochs - epoch - 1):
        assert_each_id_once(later[e * new.epoch_samples : (e + 1) * new.epoch_samples], setup.train_size, new.step_samples)
    steps = [r for r in read_metrics(resumed.out) if "val_loss" not in r]
    assert [r["step"] for r in steps] == list(range(k + 1, total + 1))  # its own output_dir: from the resume on
    assert [r["lr"] for r in steps] == pytest.approx([setup.lr * (1 - s / total) for s in range(k, total)])
    ends = [k + rest + e * new.steps_per_epoch for e in range(setup.epochs - epoch)]
    assert [r["step"] for r in val_records(resumed.out) if r["step"] > k] == ends


# ---- 1 (another world size), 3 and 4: the tied model at one global batch on 1, 2 and 3 ranks -------------


def _on_ranks(setup: Setup, world_size: int) -> Setup:
    """The same global micro-batch dealt to `world_size` ranks."""
    return setup.on(batch_size=setup.batch_size // world_size, world_size=world_size)


def _world_run_spec(i: int, world_size: int) -> tuple:
    return f"W{i}-n{world_size}", _on_ranks(WORLD_SIZE_SETUPS[i][0], world_size)


def _world_run(runs: Runs, i: int, world_size: int) -> Run:
    return runs.get(*_world_run_spec(i, world_size))


WORLD_CASES = [(i, n) for i in range(len(WORLD_SIZE_SETUPS)) for n in (2, 3)]


@pytest.mark.parametrize("i,n", WORLD_CASES, ids=[_id("W", i, WORLD_SIZE_SETUPS[i][0], f"{n}ranks") for i, n in WORLD_CASES])
def test_n_ranks_are_one_rank_at_the_same_global_batch(runs, i, n):
    setup = WORLD_SIZE_SETUPS[i][0]
    one, many = runs.get_all(*(_world_run_spec(i, world_size) for world_size in (1, n)))  # made at the same time
    assert many.sequence() == one.sequence()  # the same samples in the same optimizer steps
    assert len(one.sequence()) == setup.epochs * setup.epoch_samples
    assert_weights_equal(many.out, one.out, exact=False)  # rtol 1e-5, atol 1e-6
    ours, theirs = val_records(many.out), val_records(one.out)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [setup.steps_per_epoch, setup.total_steps]
    assert ours[-1]["num_processes"] == n
    for mine, its in zip(ours, theirs):
        assert mine["val_loss"] == pytest.approx(its["val_loss"], rel=1e-5)


@pytest.mark.parametrize("i", range(len(WORLD_SIZE_SETUPS)), ids=[_id("W", i, s[0]) for i, s in enumerate(WORLD_SIZE_SETUPS)])
def test_accumulation_is_the_big_batch(runs, i):
    setup = WORLD_SIZE_SETUPS[i][0]
    big_setup = setup.on(batch_size=setup.batch_size * setup.grad_accum_steps, grad_accum_steps=1)
    assert setup.train_size % big_setup.batch_size  # uneven data: the last step is short (and weighted) on both sides
    accumulated, big = runs.get_all(_world_run_spec(i, 1), (f"W{i}-big", big_setup))  # made at the same time
    assert big.sequence() == accumulated.sequence()
    assert_weights_equal(accumulated.out, big.out, exact=False)
    steps = lambda out: [r["step"] for r in read_metrics(out) if "val_loss" not in r]
    assert steps(accumulated.out) == steps(big.out) == list(range(1, setup.total_steps + 1))


RESIZE_CASES = [(i, n) for i in range(len(WORLD_SIZE_SETUPS)) for n in (1, 3)]


@pytest.mark.parametrize(
    "i,n",
    RESIZE_CASES,
    ids=[_id("W", i, WORLD_SIZE_SETUPS[i][0], f"2to{n}ranks-k{WORLD_SIZE_SETUPS[i][1 if n == 1 else 2]}") for i, n in RESIZE_CASES],
)
def test_resume_on_another_world_size_continues_the_epoch(runs, tmp_path, i, n):
    """Saved by 2 ranks mid-epoch, resumed on n at the same global batch (batch doubled on 1 rank)."""
    setup, k = WORLD_SIZE_SETUPS[i][0], WORLD_SIZE_SETUPS[i][1 if n == 1 else 2]
    saved = _world_run(runs, i, 2)
    resumed = runs.get(f"W{i}-2to{n}-from{k}", _on_ranks(setup, n), f"resume={checkpoint(saved, k)}", out=tmp_path / "resumed")
    epoch, into = divmod(k, setup.steps_per_epoch)
    consumed = into * setup.step_samples
    assert f"at optimizer step {k} (epoch {epoch}, {consumed} samples into it, written by 2 processes)" in resumed.stdout
    assert_weights_equal(resumed.out, saved.out, exact=False)
    # The interrupted epoch: what the 2 ranks took before step k, then the rest on n ranks: each id once.
    before = saved.sequence()[epoch * setup.epoch_samples : epoch * setup.epoch_samples + consumed]
    after = resumed.sequence()
    rest = setup.epoch_samples - consumed
    assert_each_id_once(before + after[:rest], setup.train_size, setup.step_samples)
    assert after == saved.sequence()[epoch * setup.epoch_samples + consumed :]  # and then the same later epochs
    assert val_records(resumed.out)[-1]["num_processes"] == n


@pytest.mark.parametrize(
    "i", range(len(WORLD_SIZE_SETUPS)), ids=[_id("W", i, s[0], f"3to3ranks-k{s[2]}") for i, s in enumerate(WORLD_SIZE_SETUPS)]
)
def test_resume_on_three_ranks_is_bitwise(runs, tmp_path, i):
    """Promise 1 on 3 ranks, the same world size (the resume setups above reach 3 ranks only with SIZE >= 3)."""
    setup, k = WORLD_SIZE_SETUPS[i][0], WORLD_SIZE_SETUPS[i][2]
    saved = _world_run(runs, i, 3)
    resumed = runs.get(f"W{i}-3to3-from{k}", _on_ranks(setup, 3), f"resume={checkpoint(saved, k)}", out=tmp_path / "resumed")
    epoch, into = divmod(k, setup.steps_per_epoch)
    assert f"at optimizer step {k} (epoch {epoch}, {into * setup.step_samples} samples into it)" in resumed.stdout
    assert resumed.ids == {rank: batches[setup.micro_batches_before(k) :] for rank, batches in saved.ids.items()}
    assert_weights_equal(resumed.out, saved.out, exact=False)
    assert_bitwise(load_weights(resumed.out), load_weights(saved.out))


# ---- 5. the gathered validation loss is the exact mean ---------------------------------------------------

VAL_CASES = [("R", i, s.world_size) for i, s in enumerate(RESUME_SETUPS)] + [
    ("W", i, n) for i in range(len(WORLD_SIZE_SETUPS)) for n in (1, 2, 3)
]


def _val_case_id(group: str, i: int, n: int) -> str:
    setup = RESUME_SETUPS[i] if group == "R" else _on_ranks(WORLD_SIZE_SETUPS[i][0], n)
    return _id(group, i, setup, f"{n}ranks")


@pytest.mark.parametrize("group,i,n", VAL_CASES, ids=[_val_case_id(*case) for case in VAL_CASES])
def test_gathered_val_loss_is_the_exact_mean(runs, project_module, group, i, n):
    """Each validation record against the mean the test computes in one process from the checkpoint of its
    step (written at the same step boundary, after the validation); the runs are those checked above."""
    if group == "R":
        setup, run = RESUME_SETUPS[i], _reference(runs, i)
    else:
        setup, run = _on_ranks(WORLD_SIZE_SETUPS[i][0], n), _world_run(runs, i, n)
    assert setup.val_size % setup.micro_batch_samples  # Accelerate pads the last round of batches
    records = val_records(run.out)
    assert [r["step"] for r in records] == [setup.steps_per_epoch * (e + 1) for e in range(setup.epochs)]
    for record in records:
        weights = load_file(str(checkpoint(run, record["step"]) / "model.safetensors"))
        loss, accuracy = exact_val(project_module, setup, weights)
        assert (record["val_samples"], record["num_processes"]) == (setup.val_size, setup.world_size)
        assert record["val_loss"] == pytest.approx(loss, rel=1e-6), record["step"]
        assert record["val_accuracy"] == pytest.approx(accuracy, abs=1e-12), record["step"]
    assert_bitwise(load_weights(run.out), load_file(str(checkpoint(run, setup.total_steps) / "model.safetensors")))
