"""schedules.warmup's ``delay`` and ``min_rho`` (diffusers' update_after_step and min_decay):
the defaults keep the plain formula bit for bit; the new arguments are checked."""
import math
import pickle

import pytest

from ema_kernels import schedules as S


@pytest.mark.parametrize("rho, gamma, power", [(0.999, 1.0, 2 / 3), (0.9999, 10.0, 0.75),
                                               (0.99, 0.5, 1.0)])
def test_defaults_are_the_plain_formula_bit_for_bit(rho, gamma, power):
    w = S.warmup(rho, gamma, power)
    for s in [0, 0.25, 1, 2, 3.5, 7, 100, 12345.5]:
        assert w(s) == min(rho, 1.0 - (1.0 + float(s) / gamma) ** (-power))
    for a, b in [(0, 1), (1, 2), (0, 5), (2.5, 9.25), (90, 1000)]:
        want = 1.0
        for n in range(math.floor(a), math.ceil(b)):
            want *= w(float(n)) ** (min(b, n + 1.0) - max(a, float(n)))
        assert w.decay(a, b) == pytest.approx(want, rel=1e-12)


def test_delay_and_min_rho():
    w = S.warmup(0.9, gamma=2.0, power=1.0, delay=3, min_rho=0.2)
    assert [w(s) for s in (0, 1, 2, 3)] == [0.0] * 4  # the EMA copies the parameters
    assert w(4) == max(min(0.9, 1 - (1 + 1 / 2.0) ** -1), 0.2) == pytest.approx(1 / 3)
    assert w(3.5) == 0.2  # 1 − (1 + 0.25)^−1 = 0.2
    assert w(1000) == 0.9
    assert S.warmup(0.5, min_rho=0.7)(50) == 0.7  # min_rho wins over rho (diffusers' order)
    assert w.decay(0, 4) == 0.0 and w.decay(3, 5) == pytest.approx(w(3) * w(4))
    # flat from where it reaches rho, shifted by the delay: the product there is rho^length
    assert w.decay(10_000, 10_010) == pytest.approx(0.9 ** 10)
    assert pickle.loads(pickle.dumps(w)) == w
    assert "delay=3.0" in repr(w) and w != S.warmup(0.9, 2.0, 1.0, delay=2, min_rho=0.2)
    with pytest.raises(ValueError, match="delay"):
        S.warmup(0.9, delay=-1)
    with pytest.raises(ValueError, match="min_rho"):
        S.warmup(0.9, min_rho=1.5)
