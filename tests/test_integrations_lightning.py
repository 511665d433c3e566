"""ema_kernels in Lightning: configure_optimizers returning an ek optimizer (automatic and manual
optimization, accumulation, bf16, clipping), and the EMACallback (validation and test on the EMA,
the EMAs in checkpoints, resuming bit for bit, validate/test from a checkpoint's EMA)."""
import os

import pytest
import torch

from integration_support import require

pl = require("lightning").pytorch

import ema_kernels as ek  # noqa: E402
from ema_kernels.integrations import find_ema_optimizer  # noqa: E402
from ema_kernels.integrations.lightning import EMACallback  # noqa: E402

RHO = 0.8


def data(n=32, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) * 3 + 1
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True).sin())


def loader(n=32, seed=2):
    return torch.utils.data.DataLoader(data(n, seed), batch_size=4, shuffle=False)


class Net(pl.LightningModule):
    """Linear + BatchNorm (floating-point buffers the EMA must follow) + Linear."""

    def __init__(self, opt="ek", manual=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8),
                                        torch.nn.ReLU(), torch.nn.Linear(8, 1))
        self.opt, self.manual = opt, manual
        self.automatic_optimization = not manual
        self.seen_in_val, self.seen_in_test, self.after_step = [], [], []

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, i):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if not self.manual:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def on_train_batch_end(self, outputs, batch, i):
        if len(self.after_step) < self.trainer.global_step:  # an optimizer step was taken
            self.after_step.append(([p.detach().clone() for p in self.parameters()],
                                    self.body[1].running_mean.clone()))

    def _seen(self):
        return ([p.detach().clone() for p in self.parameters()],
                self.body[1].running_mean.clone())

    def validation_step(self, batch, i):
        self.seen_in_val.append(self._seen())
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def test_step(self, batch, i):
        self.seen_in_test.append(self._seen())

    def configure_optimizers(self):
        if self.opt == "torch":
            return torch.optim.SGD(self.parameters(), lr=1e-2, momentum=0.9)
        opt = ek.AdamW(self.parameters(), lr=1e-2, ema_decay=(RHO, 0.5))
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)}


def trainer(tmp_path, callbacks=(), **kw):
    base = dict(accelerator="cpu", devices=1, max_steps=6, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=str(tmp_path),
                num_sanity_val_steps=0, limit_val_batches=1, deterministic=True)
    base.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **base)


def float64_ema(seq, rho):
    z = [t.double() for t in seq[0]]
    for xs in seq[1:]:
        z = [rho * zi + (1 - rho) * x.double() for zi, x in zip(z, xs)]
    return z


def ek_opt(trainer_):
    return find_ema_optimizer(trainer_.optimizers[0])


class ClipInPass(Net):
    """Lightning's mixed-precision plugin refuses ``gradient_clip_val`` for an optimizer that
    unscales gradients itself (torch's fused AdamW too): clip with the optimizer's own
    ``clip_grad_norm_``, applied inside the step's pass (docs/integrations.md)."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        if self.opt == "torch":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                       gradient_clip_algorithm)
        find_ema_optimizer(optimizer).clip_grad_norm_(gradient_clip_val)


@pytest.mark.parametrize("mode", ["automatic", "automatic-bf16", "manual"])
def test_ek_optimizer_trains_in_lightning_like_torch(tmp_path, mode):
    """Same runs with torch.optim.SGD and ek.SGD (momentum; no scheduler for the comparison;
    SGD rather than Adam because Adam's first steps turn 1e-8 differences of near-zero
    gradients into sign flips on this tiny model, torch's fused against its foreach AdamW
    too): parameters agree, and ek's EMA is the float64 EMA of the parameters after each step.
    Automatic optimization with gradient accumulation and clipping at every step (fp32:
    Lightning's clipping; bf16-mixed: the optimizer's in-pass clipping)."""
    manual = mode == "manual"
    kw = {} if manual else dict(accumulate_grad_batches=2, gradient_clip_val=0.05)
    if mode == "automatic-bf16":
        kw["precision"] = "bf16-mixed"
    runs = {}
    for name in ("torch", "ek"):
        m = (ClipInPass if mode == "automatic-bf16" else Net)(opt=name, manual=manual)
        if name == "ek":
            m.configure_optimizers = lambda m=m: ek.SGD(m.parameters(), lr=1e-2,
                                                        momentum=0.9, ema_decay=RHO)
        init = [p.detach().clone() for p in m.parameters()]
        t = trainer(tmp_path / name, **kw)
        t.fit(m, loader(48))
        runs[name] = (m, t, init)
    (m_t, _, init), (m_e, t_e, _) = runs["torch"], runs["ek"]
    assert len(m_e.after_step) == 6
    # (the first Linear's bias has a zero gradient: BatchNorm removes it)
    assert sum(not torch.equal(pe, p0) for pe, p0 in zip(m_e.parameters(), init)) >= 5
    for pt, pe in zip(m_t.parameters(), m_e.parameters()):
        torch.testing.assert_close(pe, pt, rtol=1e-4, atol=1e-5)
    want = float64_ema([init] + [ps for ps, _ in m_t.after_step], RHO)
    opt = ek_opt(t_e)
    assert isinstance(opt, ek.SGD)
    for z, w in zip(opt.ema_parameters(), want):
        torch.testing.assert_close(z.double(), w, rtol=1e-4, atol=1e-5)
    if manual:  # what self.optimizers() returns reaches the EMA API
        lopt = m_e.optimizers()
        assert find_ema_optimizer(lopt) is opt and lopt.optimizer is opt


def test_callback_validates_and_tests_on_the_ema_and_restores(tmp_path):
    m = Net()
    buf0 = m.body[1].running_mean.clone()
    cb = EMACallback()
    t = trainer(tmp_path, [cb], val_check_interval=3)
    t.fit(m, loader(), loader(8, seed=5))
    opt = ek_opt(t)
    assert cb.optimizer is opt and cb.teacher is not None
    assert len(m.seen_in_val) == 2  # steps 3 and 6
    params, running_mean = m.seen_in_val[-1]
    for p, z in zip(params, opt.ema_parameters()):
        assert torch.equal(p, z)
    want = float64_ema([[buf0]] + [[b] for _, b in m.after_step], RHO)[0]
    torch.testing.assert_close(running_mean.double(), want, rtol=1e-5, atol=1e-6)
    # the student is back after validation
    student, student_mean = m.after_step[-1]
    for p, s in zip(m.parameters(), student):
        assert torch.equal(p, s)
    assert torch.equal(m.body[1].running_mean, student_mean)
    assert not torch.equal(running_mean, student_mean)
    # trainer.test after fit: the live EMA, the student restored after
    t.test(m, loader(8, seed=5))
    for p, z in zip(m.seen_in_test[0][0], opt.ema_parameters()):
        assert torch.equal(p, z)
    for p, s in zip(m.parameters(), student):
        assert torch.equal(p, s)
    # no second copy of the parameters: the teacher's are the optimizer's EMA tensors
    for p, z in zip(cb.teacher.parameters(), opt.ema_parameters()):
        assert p.data_ptr() == z.data_ptr()


def test_callback_index_1_and_no_teacher_without_float_buffers(tmp_path):
    m = Net()
    m.body[1] = torch.nn.Identity()  # no floating-point buffers: nothing deep-copied
    m.body[1].running_mean = torch.zeros(8)  # what Net._seen reads (a plain attribute)
    cb = EMACallback(index=1)
    t = trainer(tmp_path, [cb], val_check_interval=6)
    t.fit(m, loader(), loader(8, seed=5))
    assert cb.teacher is None
    for p, z in zip(m.seen_in_val[-1][0], ek_opt(t).ema_parameters(1)):
        assert torch.equal(p, z)


def test_checkpoint_holds_the_emas_and_resume_is_bit_for_bit(tmp_path):
    def run(out, ckpt=None, epochs=2):
        m = Net(seed=0 if ckpt is None else 9)
        cb = EMACallback()
        mc = pl.callbacks.ModelCheckpoint(dirpath=str(out), save_top_k=-1, every_n_epochs=1,
                                          filename="{epoch}")
        t = trainer(out, [cb, mc], max_steps=-1, max_epochs=epochs, enable_checkpointing=True)
        t.fit(m, loader(), ckpt_path=ckpt)
        return m, t, cb
    m_a, t_a, cb_a = run(tmp_path / "a")
    ckpt = os.path.join(tmp_path, "a", "epoch=0.ckpt")
    saved = torch.load(ckpt, weights_only=True)
    opt_a = ek_opt(t_a)
    # the optimizer's state (EMAs included) and the EMA's own state_dict are in the checkpoint
    assert "ema" in saved["optimizer_states"][0]["state"][0]
    assert set(saved[cb_a.checkpoint_key]) == set(m_a.state_dict())
    final = torch.load(os.path.join(tmp_path, "a", "epoch=1.ckpt"), weights_only=True)
    ema_sd = final[cb_a.checkpoint_key]
    names = [n for n, _ in m_a.named_parameters()]
    for n, z in zip(names, opt_a.ema_parameters()):
        assert torch.equal(ema_sd[n], z)
    assert torch.equal(ema_sd["body.1.running_mean"], cb_a.teacher.body[1].running_mean)
    # resume from the end of epoch 0: everything bit for bit as the uninterrupted run
    m_b, t_b, cb_b = run(tmp_path / "b", ckpt=ckpt)
    opt_b = ek_opt(t_b)
    for pa, pb in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(pa, pb)
    for i in (0, 1):
        for za, zb in zip(opt_a.ema_parameters(i), opt_b.ema_parameters(i)):
            assert torch.equal(za, zb)
    for (n, ba), (_, bb) in zip(cb_a.teacher.named_buffers(), cb_b.teacher.named_buffers()):
        assert torch.equal(ba, bb), n
    assert not torch.equal(saved[cb_a.checkpoint_key][names[0]], ema_sd[names[0]])

    # validate from a checkpoint, without fitting: the checkpoint's EMA is evaluated
    m_c = Net(seed=3)
    t_c = trainer(tmp_path / "c", [EMACallback()])
    t_c.validate(m_c, loader(8, seed=5), ckpt_path=ckpt)
    params, running_mean = m_c.seen_in_val[0]
    for n, p in zip(names, params):
        assert torch.equal(p, saved[cb_a.checkpoint_key][n])
    assert torch.equal(running_mean, saved[cb_a.checkpoint_key]["body.1.running_mean"])
    for n, p in m_c.named_parameters():  # the checkpoint's student afterwards
        assert torch.equal(p, saved["state_dict"][n])


def test_callback_needs_an_ek_optimizer(tmp_path):
    with pytest.raises(ValueError, match="index"):
        EMACallback(index=True)
    with pytest.raises(TypeError, match="no ema_kernels optimizer found in SGD"):
        trainer(tmp_path, [EMACallback()]).fit(Net(opt="torch"), loader())
    with pytest.raises(IndexError, match="EMA index 2"):
        trainer(tmp_path, [EMACallback(index=2)]).fit(Net(), loader())
