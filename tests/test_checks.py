"""Bad input gets a clear error that names the argument, from the reference and the fast ops alike."""
import pytest
import torch

from svnr_fast import Schedule, ops, reference

TABLE = Schedule().table
IMPLS = [reference, ops]


def images(*shape):
    return torch.rand(*shape)


@pytest.fixture(params=IMPLS, ids=["reference", "ops"])
def impl(request):
    return request.param


def training_call(impl, x0=None, sigma_r=0.05, sigma_s=0.1, u=0.5, table=TABLE, **kwargs):
    x0 = images(2, 3, 4, 5) if x0 is None else x0
    return impl.training_sample(x0, sigma_r, sigma_s, u, table, **kwargs)


def reverse_call(impl, x=None, eps_hat=None, tau=None, delta=1.0, table=TABLE, **kwargs):
    x = images(2, 3, 4, 5) if x is None else x
    eps_hat = torch.randn_like(x) if eps_hat is None else eps_hat
    tau = torch.full((2, 1, 4, 5), 10.0) if tau is None else tau
    return impl.reverse_step(x, eps_hat, tau, delta, table, **kwargs)


@pytest.mark.parametrize("table, message", [
    (torch.tensor([0.0, 1.0, 1.0, 2.0]), r"strictly increasing; table\[2\]"),
    (torch.tensor([0.0, 2.0, 1.0]), "strictly increasing"),
    (torch.tensor([-0.1, 1.0]), r"table\[0\] must be >= 0"),
    (torch.tensor([0.5]), "at least 2 entries"),
    (torch.tensor([[0.0, 1.0]]), "table must have 1 dimensions"),
    (torch.tensor([0, 1, 2]), "table must have dtype"),
    (torch.tensor([0.0, float("nan")]), "table contains NaN"),
])
def test_bad_tables(impl, table, message):
    with pytest.raises((ValueError, TypeError), match=message):
        impl.gamma(torch.rand(3), table)
    with pytest.raises((ValueError, TypeError), match=message):
        training_call(impl, table=table)
    with pytest.raises((ValueError, TypeError), match=message):
        reverse_call(impl, table=table)


@pytest.mark.parametrize("kwargs, message", [
    ({"x0": images(3, 4, 5)}, "x0 must have 4 dimensions"),
    ({"x0": torch.zeros(2, 3, 4, 5, dtype=torch.int64)}, "x0 must have dtype"),
    ({"x0": torch.full((2, 3, 4, 5), float("nan"))}, "x0 contains NaN"),
    ({"x0": torch.full((2, 3, 4, 5), float("inf"))}, "x0 contains NaN or inf"),
    ({"sigma_r": -0.1}, "sigma_r must be >= 0"),
    ({"sigma_s": torch.tensor([0.1, -0.2])}, "sigma_s must be >= 0"),
    ({"sigma_s": torch.tensor([0.1, 0.2, 0.3])}, r"sigma_s must be a float or a tensor of shape \(2,\)"),
    ({"sigma_r": float("nan")}, "sigma_r must be finite"),
    ({"sigma_r": "0.1"}, "sigma_r must be a float"),
    ({"u": 1.5}, r"u must lie in \[0.0, 1.0\], got 1.5"),
    ({"u": -0.5}, r"u must lie in \[0.0, 1.0\], got -0.5"),
    ({"eps_T": torch.randn(2, 3, 4, 6)}, "eps_T must have the shape of x0"),
    ({"eps_prime": torch.randn(2, 3, 4, 5, device="meta")}, "eps_prime is on meta but x0 is on cpu"),
    ({"table": TABLE.to("meta")}, "table is on meta but the data is on cpu"),
    ({"seed": -1}, "seed must be an int"),
    ({"offset": 1.5}, "offset must be an int"),
])
def test_bad_training_sample_arguments(impl, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        training_call(impl, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"x": images(2, 3, 4)}, "x must have 4 dimensions"),
    ({"eps_hat": torch.randn(2, 3, 4, 6)}, "eps_hat must have the shape of x"),
    ({"eps_hat": torch.full((2, 3, 4, 5), float("inf"))}, "eps_hat contains NaN or inf"),
    ({"tau": torch.zeros(2, 2, 4, 5)}, r"tau must be a time map of shape \(B, 1, H, W\) = \(2, 1, 4, 5\) or \(B, C, H, W\)"),
    ({"tau": torch.zeros(2, 1, 4, 5, dtype=torch.float16)}, "tau must be float32"),
    ({"tau": torch.zeros(2, 1, 4, 5, device="meta")}, "tau is on meta but x is on cpu"),
    ({"delta": -1.0}, "delta must be >= 0"),
    ({"eta": 1.5}, r"eta must lie in \[0.0, 1.0\]"),
    ({"eta": float("nan")}, "eta must be finite"),
    ({"clamp": (1.0, 0.0)}, "clamp must satisfy low < high"),
    ({"clamp": 1.0}, "clamp must be None or a pair"),
    ({"z": torch.randn(1, 3, 4, 5)}, "z must have the shape of x"),
])
def test_bad_reverse_step_arguments(impl, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        reverse_call(impl, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"h": torch.randn(2, 6, 4)}, "h must have 4 dimensions"),
    ({"u": torch.rand(2, 2, 4, 5)}, r"u must be a time map of shape \(B, 1, H, W\)"),
    ({"table": torch.randn(9, 6)}, r"table must have shape \(K >= 2, 2C = 12\)"),
    ({"table": torch.randn(1, 12)}, r"table must have shape \(K >= 2"),
    ({"gn_weight": torch.ones(5)}, r"gn_weight must have shape \(6,\)"),
    ({"groups": 4}, "groups must be a positive int dividing the 6 channels"),
    ({"eps": 0.0}, "eps must be > 0"),
    ({"act": "relu"}, "act must be 'silu' or 'identity'"),
    ({"h": torch.full((2, 6, 4, 5), float("nan"))}, "h contains NaN"),
    ({"table": torch.randn(9, 12, device="meta")}, "table is on meta but h is on cpu"),
])
def test_bad_groupnorm_film_arguments(impl, kwargs, message):
    args = {"h": torch.randn(2, 6, 4, 5), "u": torch.rand(2, 1, 4, 5) * 8, "table": torch.randn(9, 12),
            "gn_weight": torch.ones(6), "gn_bias": torch.zeros(6), "groups": 3, "eps": 1e-5, "act": "silu"}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        impl.groupnorm_film(**args)


def test_lookups_reject_bad_values(impl):
    with pytest.raises(ValueError, match="tau contains NaN"):
        impl.gamma(torch.tensor([1.0, float("nan")]), TABLE)
    with pytest.raises(ValueError, match="v contains NaN or inf"):
        impl.time_from_variance(torch.tensor([float("inf")]), TABLE)
    with pytest.raises(ValueError, match="variance must have 4 dimensions"):
        impl.time_map(torch.rand(3, 4, 5), TABLE)
    with pytest.raises(TypeError, match="tau must be a torch.Tensor"):
        impl.gamma([1.0, 2.0], TABLE)


def test_groupnorm_module_rejects_bad_groups():
    from svnr_fast.nn import GroupNormSpatialFiLM
    for groups in (0, 5, 2.0):
        with pytest.raises(ValueError, match="groups must be a positive int dividing channels"):
            GroupNormSpatialFiLM(8, groups=groups)


def test_an_op_reads_its_value_checks_once(monkeypatch):
    """Each host read of a device value is a GPU sync: an op's NaN, bound and table checks share one."""
    reads = []
    for method in ("__bool__", "item"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, _original=original, _name=method: reads.append(_name) or _original(self))
    x = images(2, 3, 4, 5)
    u = torch.rand(2, 1, 4, 5) * 8
    calls = {
        "reverse_step": lambda: reverse_call(ops, delta=torch.tensor([1.0, 2.0]), eta=0.5, clamp=(0, 1)),
        "training_sample": lambda: training_call(ops, sigma_r=torch.tensor([0.01, 0.1]), u=torch.rand(2), seed=3),
        "groupnorm_film": lambda: ops.groupnorm_film(torch.randn(2, 6, 4, 5), u, torch.randn(9, 12), torch.ones(6),
                                                     torch.zeros(6), 3, 1e-5, "silu"),
        "gamma": lambda: ops.gamma(u, TABLE),
        "reference.time_map": lambda: reference.time_map(x, TABLE),
    }
    for name, call in calls.items():
        reads.clear()
        call()
        assert reads == ["__bool__"], (name, reads)


@pytest.mark.parametrize("bad, message", [
    ({"x": torch.full((2, 3, 4, 5), float("inf")), "delta": torch.tensor([-1.0, 1.0])}, "x contains NaN or inf"),
    ({"delta": torch.tensor([1.0, -2.0])}, r"delta must be >= 0.0, got -2"),
    ({"table": torch.tensor([0.0, 0.2, 0.1])}, r"table\[2\] = 0.1.* <= table\[1\] = 0.2"),
])
def test_gathered_checks_raise_the_first_failure_in_order(impl, bad, message):
    with pytest.raises(ValueError, match=message):
        reverse_call(impl, **bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_the_one_pass_scan_finds_every_non_finite_value(dtype):
    """finite() reads a tensor once (a sum, or torch.aminmax): a NaN or an inf anywhere, in the vectorised
    body or the tail of a row, fails it; the largest finite values pass, also where their sum overflows."""
    from svnr_fast.ops import _checks
    for n in (1, 7, 64, 1000, 4099):
        big = torch.finfo(dtype).max
        _checks.finite("v", torch.tensor([big, -big] * n, dtype=dtype)[:n])
        _checks.finite("v", torch.full((n,), big, dtype=dtype))   # finite values whose sum overflows
        for position in {0, n // 2, n - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                value = torch.rand(n).to(dtype)
                value[position] = bad
                with pytest.raises(ValueError, match="v contains NaN or inf"):
                    _checks.finite("v", value)


def test_a_table_is_read_once_until_it_changes():
    from svnr_fast.ops import _checks
    table = Schedule().table.clone()
    reverse_call(ops, table=table)
    reads = []
    original = _checks.finite
    _checks.finite = lambda name, value: reads.append(name) or original(name, value)
    try:
        reverse_call(ops, table=table)
        assert "table" not in reads
        table[3] = table[1]   # an in-place change bumps the version: the table is read again
        with pytest.raises(ValueError, match="strictly increasing"):
            reverse_call(ops, table=table)
        assert "table" in reads
    finally:
        _checks.finite = original


def test_a_table_that_failed_is_read_again():
    bad = torch.tensor([0.0, 0.2, 0.1])
    for _ in range(2):
        with pytest.raises(ValueError, match="strictly increasing"):
            reverse_call(ops, table=bad)


def test_an_inference_mode_table_is_checked():
    with torch.inference_mode():
        table = Schedule().table.clone()
        reverse_call(ops, table=table)
        bad = torch.tensor([0.0, 0.2, 0.1])
        with pytest.raises(ValueError, match="strictly increasing"):
            reverse_call(ops, table=bad)
