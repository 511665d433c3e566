"""ema_kernels in Hugging Face's Trainer: training, the EMACallback (evaluation on the EMA,
the EMA saved beside each checkpoint), resuming, gradient accumulation, bf16 and clipping.

Tiny models built from configs here: nothing is downloaded (HF_HUB_OFFLINE=1)."""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from integration_support import require  # noqa: E402

transformers = require("transformers")
require("accelerate")
require("safetensors")

from transformers import (GPT2Config, GPT2LMHeadModel, PretrainedConfig,  # noqa: E402
                          PreTrainedModel, Trainer, TrainerCallback, TrainingArguments)
from safetensors.torch import load_file  # noqa: E402

import ema_kernels as ek  # noqa: E402
from ema_kernels.integrations.transformers import EMACallback  # noqa: E402

RHO = 0.8


# --- tiny models and data -------------------------------------------------------------------
def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=1):
        self.x = torch.randint(0, 64, (n, 8), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


class TinyConfig(PretrainedConfig):
    model_type = "ek_tiny_bn"

    def __init__(self, width=8, **kw):
        self.width = width
        super().__init__(**kw)


class TinyBN(PreTrainedModel):
    """A regression net with BatchNorm: floating-point buffers the EMA must follow."""
    config_class = TinyConfig

    def __init__(self, config):
        super().__init__(config)
        w = config.width
        self.lin = torch.nn.Linear(w, w)
        self.bn = torch.nn.BatchNorm1d(w)
        self.head = torch.nn.Linear(w, 1)
        self.post_init()

    def _init_weights(self, module):
        pass  # torch's own initialisation (seeded by the test)

    def forward(self, x, labels=None):
        out = self.head(torch.relu(self.bn(self.lin(x)))).squeeze(-1)
        loss = None if labels is None else torch.nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def tiny_bn(seed=0):
    torch.manual_seed(seed)
    return TinyBN(TinyConfig())


class Regression(torch.utils.data.Dataset):
    def __init__(self, n, seed=2):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 8, generator=g) * 3 + 1
        self.y = self.x.sum(1).sin()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, per_device_eval_batch_size=8,
                max_steps=6, learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=0,
                report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
                data_seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return TrainingArguments(**base)


def scheduler(opt):
    return transformers.get_linear_schedule_with_warmup(opt, 0, 6)


class Recorder(TrainerCallback):
    """Records the student's parameters (and buffers) after every optimizer step, and what the
    model holds while it is evaluated."""

    def __init__(self):
        self.after_step = []
        self.buffers = []
        self.during_eval = []

    def on_step_end(self, args, state, control, model=None, **kw):
        with torch.no_grad():
            self.after_step.append([p.detach().clone() for p in model.parameters()])
            self.buffers.append({n: b.clone() for n, b in model.named_buffers()
                                 if b.is_floating_point()})

    def on_prediction_step(self, args, state, control, model=None, **kw):
        self.during_eval.append((state.global_step,
                                 [p.detach().clone() for p in model.parameters()],
                                 {n: b.clone() for n, b in model.named_buffers()
                                  if b.is_floating_point()}))


def float64_ema(seq, rho):
    """ζ_0 = the first element, ζ ← ρζ + (1 − ρ)x over the rest, in float64."""
    z = [t.double() for t in seq[0]]
    for xs in seq[1:]:
        z = [rho * zi + (1 - rho) * x.double() for zi, x in zip(z, xs)]
    return z


# --- training: ek.AdamW against torch.optim.AdamW in the same Trainer -------------------------
def test_trainer_trains_like_torch_adamw_with_accumulation_bf16_and_clipping(tmp_path):
    """One Trainer run with torch.optim.AdamW, one with ek.AdamW (same seeds, gradient
    accumulation 2, CPU bf16 autocast, max_grad_norm small enough to clip every step): the
    parameters, the logged gradient norms and losses agree, and ek's EMA is the float64 EMA of
    the parameters the torch run went through."""
    kw = dict(gradient_accumulation_steps=2, bf16=True, max_grad_norm=0.05)
    runs = {}
    for name in ("torch", "ek"):
        model = gpt2()
        init = [p.detach().clone() for p in model.parameters()]
        if name == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
        else:
            opt = ek.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01, ema_decay=RHO)
        rec = Recorder()
        tr = Trainer(model=model, args=args(tmp_path / name, **kw), train_dataset=Tokens(48),
                     optimizers=(opt, scheduler(opt)), callbacks=[rec])
        tr.train()
        logs = [h for h in tr.state.log_history if "grad_norm" in h]
        runs[name] = (model, opt, rec, init, logs)
    (m_t, _, rec_t, init, logs_t), (m_e, opt_e, _, _, logs_e) = runs["torch"], runs["ek"]
    assert len(logs_t) == len(logs_e) == 6
    for a, b in zip(logs_t, logs_e):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["grad_norm"] > kw["max_grad_norm"]  # clipping is active at every step
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    for pt, pe, p0 in zip(m_t.parameters(), m_e.parameters(), init):
        assert not torch.equal(pe, p0)  # it trained
        torch.testing.assert_close(pe, pt, rtol=1e-4, atol=1e-5)
    want = float64_ema([init] + rec_t.after_step, RHO)
    for z, w in zip(opt_e.ema_parameters(), want):
        torch.testing.assert_close(z.double(), w, rtol=1e-4, atol=1e-5)


def test_trainer_wraps_ek_optimizer_and_find_ema_optimizer_unwraps(tmp_path):
    from ema_kernels.integrations import find_ema_optimizer
    model = gpt2()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=RHO)
    tr = Trainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=Tokens(8),
                 optimizers=(opt, scheduler(opt)))
    tr.train()
    assert tr.optimizer is not opt  # accelerate's AcceleratedOptimizer
    assert find_ema_optimizer(tr.optimizer) is opt
    with pytest.raises(TypeError, match="no ema_kernels optimizer found in AdamW"):
        find_ema_optimizer(torch.optim.AdamW(gpt2().parameters()))


# --- the callback: evaluation on the EMA, saved EMA folders ------------------------------------
def test_callback_evaluates_on_the_ema_and_saves_it_beside_each_checkpoint(tmp_path):
    model = gpt2()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=RHO)
    rec = Recorder()  # listed first: its on_step_end sees the student, before the swap
    cb = EMACallback()
    eval_set = Tokens(8, seed=5)
    tr = Trainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=3,
                                        save_strategy="steps", save_steps=3),
                 train_dataset=Tokens(32), eval_dataset=eval_set,
                 optimizers=(opt, scheduler(opt)), callbacks=[rec, cb])
    tr.train()
    # evaluations at steps 3 and 6 ran on the EMA ...
    steps = sorted({s for s, _, _ in rec.during_eval})
    assert steps == [3, 6]
    evals = [h for h in tr.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [3, 6]
    for step, params, _ in rec.during_eval:
        if step == 6:
            for p, z in zip(params, opt.ema_parameters()):
                assert torch.equal(p, z)
    # ... and the student came back bit for bit after each
    for p, s in zip(model.parameters(), rec.after_step[-1]):
        assert torch.equal(p, s)
    assert not all(torch.equal(p, z) for p, z in zip(model.parameters(), opt.ema_parameters()))
    # the checkpoint's model is the student (saved after the evaluation swapped back)
    saved = load_file(os.path.join(tmp_path, "checkpoint-3", "model.safetensors"))
    names = [n for n, _ in model.named_parameters()]
    for n, s in zip(names, rec.after_step[2]):
        if n in saved:
            assert torch.equal(saved[n], s)
    # the EMA beside each checkpoint loads with from_pretrained: the final one is the final EMA
    ema_model = GPT2LMHeadModel.from_pretrained(os.path.join(tmp_path, "checkpoint-6", "ema"))
    for (n, p), z in zip(ema_model.named_parameters(), opt.ema_parameters()):
        assert torch.equal(p, z), n
    # the logged eval loss at step 6 is the loss of that EMA model, evaluated alone
    alone = Trainer(model=ema_model, args=args(tmp_path / "alone"), eval_dataset=eval_set)
    assert evals[-1]["eval_loss"] == pytest.approx(alone.evaluate()["eval_loss"], rel=1e-6)
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    assert os.path.isfile(os.path.join(tmp_path, "checkpoint-3", "ema", "config.json"))


def test_callback_evaluates_the_ema_of_the_buffers(tmp_path):
    """BatchNorm's running statistics: the evaluated model holds their EMA (the float64 EMA of
    the student's buffers after each step), the student's own come back after."""
    model = tiny_bn()
    buf0 = {n: b.clone() for n, b in model.named_buffers() if b.is_floating_point()}
    opt = ek.SGD(model.parameters(), lr=1e-2, momentum=0.9, ema_decay=RHO)
    rec = Recorder()
    tr = Trainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=6),
                 train_dataset=Regression(32), eval_dataset=Regression(8, seed=3),
                 optimizers=(opt, scheduler(opt)), callbacks=[rec, EMACallback()])
    tr.train()
    assert {step for step, _, _ in rec.during_eval} == {6}
    _, params, bufs = rec.during_eval[0]
    for p, z in zip(params, opt.ema_parameters()):
        assert torch.equal(p, z)
    for n in ("bn.running_mean", "bn.running_var"):
        want = float64_ema([[buf0[n]]] + [[b[n]] for b in rec.buffers], RHO)[0]
        torch.testing.assert_close(bufs[n].double(), want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(bufs[n], rec.buffers[-1][n])
        assert torch.equal(dict(model.named_buffers())[n], rec.buffers[-1][n])  # restored


def test_callback_save_pretrained_folder_holds_ema_buffers_and_with_block(tmp_path):
    model = tiny_bn()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=(RHO, 0.5))
    cb0, cb1 = EMACallback(), EMACallback(index=1, evaluate=False)
    tr = Trainer(model=model, args=args(tmp_path, save_strategy="steps", save_steps=6),
                 train_dataset=Regression(32), optimizers=(opt, scheduler(opt)),
                 callbacks=[cb0, cb1])
    tr.train()
    for cb, idx in ((cb0, 0), (cb1, 1)):
        folder = os.path.join(tmp_path, "checkpoint-6", cb.folder_name)
        loaded = TinyBN.from_pretrained(folder)
        for p, z in zip(loaded.parameters(), opt.ema_parameters(idx)):
            assert torch.equal(p, z)
        for (n, b), (_, t) in zip(loaded.named_buffers(), cb.teacher.named_buffers()):
            assert torch.equal(b, t), n
    assert cb1.folder_name == "ema_1"
    student = [p.detach().clone() for p in model.parameters()]
    with cb1.ema_weights() as m:
        assert m is model
        for p, z in zip(model.parameters(), opt.ema_parameters(1)):
            assert torch.equal(p, z)
        assert torch.equal(model.bn.running_mean, cb1.teacher.bn.running_mean)
    for p, s in zip(model.parameters(), student):
        assert torch.equal(p, s)


def test_callback_rejects_a_missing_ema_and_a_torch_optimizer(tmp_path):
    with pytest.raises(ValueError, match="index=-1"):
        EMACallback(index=-1)
    model = tiny_bn()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=RHO)
    tr = Trainer(model=model, args=args(tmp_path), train_dataset=Regression(8),
                 optimizers=(opt, scheduler(opt)), callbacks=[EMACallback(index=1)])
    with pytest.raises(IndexError, match="EMA index 1 is out of range"):
        tr.train()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="no ema_kernels optimizer"):  # at construction
        Trainer(model=model, args=args(tmp_path), train_dataset=Regression(8),
                optimizers=(opt, scheduler(opt)), callbacks=[EMACallback()])


# --- resuming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("make_model, data", [(gpt2, Tokens), (tiny_bn, Regression)],
                         ids=["gpt2", "batchnorm"])
def test_resume_from_checkpoint_restores_the_emas_bit_for_bit(tmp_path, make_model, data):
    def run(out, resume=None):
        model = make_model(seed=0 if resume is None else 7)  # resuming loads the weights
        opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=(RHO, 0.5))
        cb = EMACallback()
        tr = Trainer(model=model, args=args(out, save_strategy="steps", save_steps=3),
                     train_dataset=data(32), optimizers=(opt, scheduler(opt)), callbacks=[cb])
        tr.train(resume_from_checkpoint=resume)
        return model, opt, cb
    m_a, opt_a, cb_a = run(tmp_path / "a")
    m_b, opt_b, cb_b = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    for pa, pb in zip(m_a.parameters(), m_b.parameters()):
        assert torch.equal(pa, pb)
    for i in (0, 1):
        for za, zb in zip(opt_a.ema_parameters(i), opt_b.ema_parameters(i)):
            assert torch.equal(za, zb)
    for (n, ba), (_, bb) in zip(cb_a.teacher.named_buffers(), cb_b.teacher.named_buffers()):
        assert torch.equal(ba, bb), n
    # and the EMA really moved after the checkpoint (the test could fail)
    ema3 = load_file(os.path.join(tmp_path, "a", "checkpoint-3", "ema", "model.safetensors"))
    name, z = next(iter(zip([n for n, _ in m_a.named_parameters()], opt_a.ema_parameters())))
    assert not torch.equal(ema3[name], z)


def test_saved_ema_of_a_flatten_optimizer_with_tied_weights(tmp_path):
    """flatten=True: the EMAs are views of one buffer (safetensors refuses shared storage);
    GPT-2 ties lm_head to wte. The folder still loads, equal to the EMA."""
    model = gpt2()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=RHO, flatten=True)
    tr = Trainer(model=model, args=args(tmp_path, max_steps=2, save_strategy="steps",
                                        save_steps=2),
                 train_dataset=Tokens(16), optimizers=(opt, scheduler(opt)),
                 callbacks=[EMACallback()])
    tr.train()
    loaded = GPT2LMHeadModel.from_pretrained(os.path.join(tmp_path, "checkpoint-2", "ema"))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    for p, z in zip(loaded.parameters(), opt.ema_parameters()):
        assert torch.equal(p, z)
    assert not torch.equal(opt.ema_parameters()[0], model.transformer.wte.weight)


class PlainNet(torch.nn.Module):
    """Not a PreTrainedModel (no save_pretrained): the EMA folder holds model.safetensors."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x, labels=None):
        out = self.head(torch.tanh(self.lin(x))).squeeze(-1)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


@pytest.mark.parametrize("flatten", [False, True])
def test_saved_ema_of_a_plain_module(tmp_path, flatten):
    model = PlainNet()
    opt = ek.AdamW(model.parameters(), lr=1e-2, ema_decay=RHO, flatten=flatten)
    tr = Trainer(model=model, args=args(tmp_path, max_steps=2, save_strategy="steps",
                                        save_steps=2),
                 train_dataset=Regression(16), optimizers=(opt, scheduler(opt)),
                 callbacks=[EMACallback()])
    tr.train()
    saved = load_file(os.path.join(tmp_path, "checkpoint-2", "ema", "model.safetensors"))
    assert sorted(saved) == sorted(n for n, _ in model.named_parameters())
    for z, (n, _) in zip(opt.ema_parameters(), model.named_parameters()):
        assert torch.equal(saved[n], z)
