r"""Hard-attention problems: a tiny random model with exact answers, and cluttered digits.

Both are models whose attention locations are drawn from the model's own distribution
p(l | I, W) and that :class:`~pyro_elbo_ext.elbos.hard_attention.HardAttentionELBO` trains
with the empty guide (Ba, Mnih & Kavukcuoglu 2014, arXiv:1412.7755):

    log p(y | I, W) = log sum_l p(l | I, W) p(y | l, I, W)
                    >= F = sum_l p(l | I, W) log p(y | l, I, W)

``random_attention`` has a few examples and a few locations, so that F, dF and log p(y) come
from brute-force enumeration; ``cluttered_digits`` is a small cluttered-MNIST-like task built
from scikit-learn's bundled 8x8 digits (no download), and :func:`train_hard_attention` trains
it with SVI and reports the test accuracy and the wall time.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.params.param_store import param_with_module_name
from torch import nn

from .._extras import require
from ..elbos.hard_attention import HardAttentionELBO, empty_guide
from .base import Problem


# ---------------------------------------------------------------------------- random model
def random_attention(
    num_data: int = 3,
    num_locations: int = 4,
    num_glimpses: int = 1,
    num_classes: int = 3,
    num_features: int = 2,
    init_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """A small random hard-attention model with ``num_glimpses`` dependent glimpses.

    Model (plate "data" over i; ``x_i`` inputs, ``g_i[l]`` the features seen at location l)::

        l_1 | x_i         ~ Categorical(logits = x_i @ att_w)
        l_t | l_{t-1}, x_i ~ Categorical(logits = x_i @ att_w + trans[l_{t-1}])     (t >= 2)
        y_i | l_1..l_T    ~ Categorical(logits = sum_t g_i[l_t] @ cls_w[t])

    Each attention site carries ``infer={"baseline_input": x_i}`` for a learned baseline.
    The guide is :func:`~pyro_elbo_ext.elbos.hard_attention.empty_guide`.  The parameters
    start at standard normal draws times ``init_scale`` (smaller: flatter attention).

    ``exact_elbo(params)`` is F by brute-force enumeration of the ``L ** T`` location
    sequences (differentiable, so its autograd gradient is the exact dF), and
    ``notes["log_evidence_fn"](params)`` is log p(y) the same way.
    """
    if num_glimpses < 1:
        raise ValueError(f"num_glimpses must be >= 1, got {num_glimpses!r}")
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(dtype=dtype,
                                                                               device=device)

    x = randn(num_data, num_features)
    glimpses = randn(num_data, num_locations, num_features)
    y = torch.randint(num_classes, (num_data,), generator=gen).to(device)
    rows = torch.arange(num_data, device=device)

    def model(x, glimpses, y):
        att_w = pyro.param("att_w", lambda: init["att_w"].clone())
        cls_w = pyro.param("cls_w", lambda: init["cls_w"].clone())
        trans = pyro.param("trans", lambda: init["trans"].clone()) if num_glimpses > 1 else None
        base_logits = x @ att_w
        logits_y = 0.0
        previous = None
        with pyro.plate("data", x.shape[0]):
            for t in range(num_glimpses):
                logits = base_logits if previous is None else base_logits + trans[previous]
                loc = pyro.sample(f"l{t}", dist.Categorical(logits=logits),
                                  infer={"baseline_input": x})
                logits_y = logits_y + glimpses[rows, loc] @ cls_w[t]
                previous = loc
            pyro.sample("y", dist.Categorical(logits=logits_y), obs=y)

    def sequence_log_probs(params):
        """(log p(l_1..l_T | x_i), log p(y_i | l_1..l_T)) for every sequence: (L^T, N) each."""
        log_pl, log_py = [], []
        base = x @ params["att_w"]
        for seq in itertools.product(range(num_locations), repeat=num_glimpses):
            lp = 0.0
            logits_y = 0.0
            for t, loc in enumerate(seq):
                logits = base if t == 0 else base + params["trans"][seq[t - 1]]
                lp = lp + torch.log_softmax(logits, -1)[:, loc]
                logits_y = logits_y + glimpses[:, loc] @ params["cls_w"][t]
            log_pl.append(lp)
            log_py.append(torch.log_softmax(logits_y, -1)[rows, y])
        return torch.stack(log_pl), torch.stack(log_py)

    def exact_elbo(params):
        log_pl, log_py = sequence_log_probs(params)
        return (log_pl.exp() * log_py).sum()

    def log_evidence_fn(params):
        log_pl, log_py = sequence_log_probs(params)
        return torch.logsumexp(log_pl + log_py, 0).sum()

    init = {
        "att_w": randn(num_features, num_locations, s=init_scale),
        "cls_w": randn(num_glimpses, num_features, num_classes, s=init_scale),
    }
    if num_glimpses > 1:
        init["trans"] = randn(num_locations, num_locations, s=init_scale)
    return Problem(
        name="random_attention",
        description=f"random hard-attention model: {num_data} examples, {num_locations} "
        f"locations, {num_glimpses} dependent glimpse(s); F and log p(y) by enumeration",
        model=model,
        guide=empty_guide,
        args=(x, glimpses, y),
        init_params=init,
        log_evidence=float(log_evidence_fn(init)),
        exact_elbo=exact_elbo,
        max_plate_nesting=1,
        notes={"log_evidence_at": "init_params", "log_evidence_fn": log_evidence_fn,
               "attention_sites": [f"l{t}" for t in range(num_glimpses)]},
    )


# ---------------------------------------------------------------------------- cluttered digits
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    datasets = require("sklearn.datasets", "compare", "the digits data set")
    digits = datasets.load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def make_cluttered_digits(
    images: np.ndarray,
    labels: np.ndarray,
    num_examples: int,
    canvas: int,
    num_distractors: int,
    fragment: int,
    rng: np.random.Generator,
    grid: list[tuple[int, int]] | None = None,
    jitter: int = 1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canvases with one 8x8 digit at a random position among distractor fragments.

    The digit's top-left corner is uniform over the canvas, or, when ``grid`` is given, a
    uniformly chosen grid point moved by a uniform offset in ``[-jitter, jitter]`` per axis
    (clipped to the canvas).  Each distractor is placed where it does not overlap the digit
    (when 20 tries find such a place; otherwise where the last try fell).  Each distractor is a
    ``fragment x fragment`` crop of another random digit; the digit is pasted last (pixelwise
    maximum).

    Returns
    -------
    canvases : (num_examples, canvas, canvas) float32
    targets : (num_examples,) int64
    positions : (num_examples, 2) int64, the digit's top-left corner
    """
    size = images.shape[-1]
    out = np.zeros((num_examples, canvas, canvas), dtype=np.float32)
    which = rng.integers(len(images), size=num_examples)
    if grid is None:
        positions = rng.integers(canvas - size + 1, size=(num_examples, 2))
    else:
        positions = np.asarray(grid)[rng.integers(len(grid), size=num_examples)]
        positions = positions + rng.integers(-jitter, jitter + 1, size=(num_examples, 2))
        positions = np.clip(positions, 0, canvas - size)
    for i in range(num_examples):
        dr, dc = positions[i]
        for _ in range(num_distractors):
            src = images[rng.integers(len(images))]
            r, c = rng.integers(size - fragment + 1, size=2)
            for _try in range(20):  # keep fragments off the digit where there is room
                pr, pc = rng.integers(canvas - fragment + 1, size=2)
                if pr + fragment <= dr or pr >= dr + size or pc + fragment <= dc or pc >= dc + size:
                    break
            patch = out[i, pr:pr + fragment, pc:pc + fragment]
            np.maximum(patch, src[r:r + fragment, c:c + fragment], out=patch)
        patch = out[i, dr:dr + size, dc:dc + size]
        np.maximum(patch, images[which[i]], out=patch)
    return out, labels[which], positions


def glimpse_grid(canvas: int, glimpse: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the candidate glimpses (row-major)."""
    starts = list(range(0, canvas - glimpse + 1, stride))
    if starts[-1] != canvas - glimpse:
        starts.append(canvas - glimpse)
    return [(r, c) for r in starts for c in starts]


def canvases_from_glimpses(
    patches: torch.Tensor, canvas: int, glimpse: int = 8, stride: int = 4
) -> torch.Tensor:
    """The inverse of :func:`views` for display: paste every glimpse back at its grid corner.

    Overlapping glimpses agree where they overlap; where the grid covers the whole canvas (as
    it does by construction of :func:`glimpse_grid`) the canvas is recovered exactly.

    Parameters
    ----------
    patches : Tensor (N, num_locations, glimpse ** 2)
        The glimpses, as in ``problem.args[1]`` of :func:`cluttered_digits`.
    canvas, glimpse, stride : int
        The problem's sizes.

    Returns
    -------
    Tensor (N, canvas, canvas)
    """
    out = patches.new_zeros(patches.shape[0], canvas, canvas)
    for k, (r, c) in enumerate(glimpse_grid(canvas, glimpse, stride)):
        out[:, r:r + glimpse, c:c + glimpse] = patches[:, k].reshape(-1, glimpse, glimpse)
    return out


def views(canvases: np.ndarray, glimpse: int, stride: int, coarse_factor: int):
    """The coarse view (average-pooled canvas, flattened) and every candidate glimpse.

    Returns
    -------
    coarse : Tensor (N, (canvas / coarse_factor) ** 2)
    patches : Tensor (N, num_locations, glimpse ** 2)
    """
    x = torch.from_numpy(canvases)
    n, s, _ = x.shape
    coarse = torch.nn.functional.avg_pool2d(x.unsqueeze(1), coarse_factor).reshape(n, -1)
    patches = torch.stack(
        [x[:, r:r + glimpse, c:c + glimpse].reshape(n, -1)
         for r, c in glimpse_grid(s, glimpse, stride)], 1
    )
    return coarse, patches


def cluttered_digits(
    canvas: int = 16,
    glimpse: int = 8,
    stride: int = 4,
    coarse_factor: int = 2,
    num_distractors: int = 4,
    fragment: int = 4,
    jitter: int = 1,
    num_train: int = 5000,
    num_test: int = 1000,
    batch_size: int = 64,
    hidden_dim: int = 64,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """Hard attention on cluttered 8x8 digits (scikit-learn's bundled digits, no download).

    Each example is a ``canvas x canvas`` image holding one digit among ``num_distractors``
    ``fragment x fragment`` pieces of other digits; the digit sits at a random glimpse-grid
    location moved by up to ``jitter`` pixels per axis, so that exactly one glimpse (mostly)
    contains it.  The model::

        l | I ~ Categorical(logits = a_W(coarse(I)))        one of the glimpse-grid locations
        y | l, I ~ Categorical(logits = c_W(glimpse(I, l)))

    ``coarse(I)`` is the canvas average-pooled by ``coarse_factor``, ``glimpse(I, l)`` the
    ``glimpse x glimpse`` crop at grid location l (grid stride ``stride``); ``a_W`` and
    ``c_W`` are one-hidden-layer MLPs registered with ``pyro.module(...,
    update_module_params=True)`` as ``"attention"`` and ``"classifier"``, so their weights are the
    param store's leaves and ``init_params`` holds their starting values
    (``Problem.set_params`` resets them; gradient statistics see them).  The plate subsamples
    ``batch_size`` examples per step.  The guide is
    :func:`~pyro_elbo_ext.elbos.hard_attention.empty_guide`; the attention site ``"where"``
    carries ``infer={"baseline_input": coarse}`` for a learned baseline.

    Digits are split into train and test images before cluttering, so test digits are unseen.
    ``notes`` holds ``test_args`` (coarse, patches, labels of the test set), ``networks``,
    ``num_locations``, ``chance`` and ``predict(coarse, patches) -> labels`` (classify from
    the most probable glimpse).
    """
    if canvas < glimpse or glimpse > 8:
        raise ValueError(f"need glimpse <= 8 and canvas >= glimpse, got {glimpse}, {canvas}")
    if canvas % coarse_factor:
        raise ValueError(f"canvas={canvas} must be a multiple of coarse_factor={coarse_factor}")
    dtype = dtype or torch.get_default_dtype()
    rng = np.random.default_rng(seed)
    images, labels = _load_digits()
    order = rng.permutation(len(images))
    split = int(0.7 * len(images))
    train_idx, test_idx = order[:split], order[split:]
    data = {}
    true_location = {}
    for part, idx, n in (("train", train_idx, num_train), ("test", test_idx, num_test)):
        canvases, targets, positions = make_cluttered_digits(
            images[idx], labels[idx], n, canvas, num_distractors, fragment, rng,
            grid=glimpse_grid(canvas, glimpse, stride), jitter=jitter,
        )
        coarse, patches = views(canvases, glimpse, stride, coarse_factor)
        data[part] = (coarse.to(dtype=dtype, device=device),
                      patches.to(dtype=dtype, device=device),
                      torch.from_numpy(targets).to(device))
        corners = torch.tensor(glimpse_grid(canvas, glimpse, stride), dtype=torch.float32)
        distance = (torch.from_numpy(positions).float().unsqueeze(1) - corners).abs().sum(-1)
        true_location[part] = distance.argmin(-1)  # the glimpse that best covers the digit
    num_locations = data["train"][1].shape[1]
    torch_gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    attention = nn.Sequential(nn.Linear(data["train"][0].shape[1], hidden_dim), nn.ReLU(),
                              nn.Linear(hidden_dim, num_locations))
    classifier = nn.Sequential(nn.Linear(glimpse * glimpse, hidden_dim), nn.ReLU(),
                               nn.Linear(hidden_dim, 10))
    torch.random.set_rng_state(torch_gen_state)
    attention.to(dtype=dtype, device=device)
    classifier.to(dtype=dtype, device=device)
    with torch.no_grad():  # start from uniform attention, so that every glimpse is explored
        attention[-1].weight.zero_()
        attention[-1].bias.zero_()

    def model(coarse, patches, labels):
        pyro.module("attention", attention, update_module_params=True)
        pyro.module("classifier", classifier, update_module_params=True)
        with pyro.plate("data", coarse.shape[0], subsample_size=min(batch_size, coarse.shape[0])
                        ) as idx:
            view = coarse[idx]
            where = pyro.sample("where", dist.Categorical(logits=attention(view)),
                                infer={"baseline_input": view})
            seen = patches[idx, where]
            pyro.sample("y", dist.Categorical(logits=classifier(seen)), obs=labels[idx])

    def predict(coarse: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            where = attention(coarse).argmax(-1)
            seen = patches[torch.arange(coarse.shape[0]), where]
            return classifier(seen).argmax(-1)

    return Problem(
        name="cluttered_digits",
        description=f"hard attention on {canvas}x{canvas} cluttered 8x8 digits, "
        f"{num_locations} glimpse locations",
        model=model,
        guide=empty_guide,
        args=data["train"],
        init_params={
            param_with_module_name(module_name, name): value.detach().clone()
            for module_name, net in (("attention", attention), ("classifier", classifier))
            for name, value in net.named_parameters()
        },
        max_plate_nesting=1,
        notes={"test_args": data["test"], "networks": {"attention": attention,
                                                      "classifier": classifier},
               "num_locations": num_locations,
               "true_location": true_location, "chance": 0.1, "predict": predict},
    )


def train_hard_attention(
    estimator: str = "enum",
    baseline: str | None = None,
    num_steps: int = 600,
    lr: float = 1e-2,
    num_particles: int = 1,
    seed: int = 0,
    problem: Problem | None = None,
    elbo_options: dict | None = None,
    **problem_options,
) -> dict:
    """Train the cluttered-digits model with SVI and :class:`HardAttentionELBO`.

    Parameters
    ----------
    estimator, baseline
        Passed to :class:`HardAttentionELBO`; ``baseline="leave_one_out"`` uses vectorized
        particles (``num_particles >= 2``).
    num_steps, lr
        SVI steps and the Adam learning rate.
    problem
        A :func:`cluttered_digits` problem (built from ``problem_options`` when omitted).
    elbo_options
        More keyword arguments for :class:`HardAttentionELBO` (e.g. ``entropy_weight``).

    Returns
    -------
    dict
        ``accuracy`` (test, classifying from the most probable glimpse), ``chance``,
        ``seconds`` (wall time of the SVI loop), ``final_loss`` (mean of the last 50 losses)
        and ``losses``.
    """
    pyro.set_rng_seed(seed)
    if problem is None:
        problem = cluttered_digits(seed=seed, **problem_options)
    pyro.clear_param_store()
    elbo = HardAttentionELBO(
        estimator=estimator, baseline=baseline, num_particles=num_particles,
        vectorize_particles=num_particles > 1, max_plate_nesting=problem.max_plate_nesting,
        **(elbo_options or {}),
    )
    svi = pyro.infer.SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
    losses = []
    start = time.perf_counter()
    for _ in range(num_steps):
        losses.append(svi.step(*problem.args))
    seconds = time.perf_counter() - start
    coarse, patches, labels = problem.notes["test_args"]
    accuracy = float((problem.notes["predict"](coarse, patches) == labels).double().mean())
    return {
        "accuracy": accuracy,
        "chance": problem.notes["chance"],
        "seconds": seconds,
        "final_loss": float(np.mean(losses[-50:])),
        "losses": losses,
    }


__all__ = ["cluttered_digits", "make_cluttered_digits", "random_attention",
           "train_hard_attention", "views", "glimpse_grid"]
