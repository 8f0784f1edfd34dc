"""fastdiff.schedulers against diffusers' schedulers: whole trajectories, methods, config, pipelines."""

import inspect
import logging

import pytest
import torch

from fastdiff import schedulers as fs
from fastdiff import use_backend
from fastdiff.testing import backends_for, max_rel_error, no_cuda_sync

diffusers = pytest.importorskip("diffusers")

# diffusers' own set_timesteps warns under numpy 2 (np.array of a tensor)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-4  # max |fastdiff - diffusers| / max |diffusers|, fp32, every step


def fake_model(x, t, channels=None):
    """A deterministic stand-in for a denoiser: a smooth function of (x, t)."""
    t = float(t)
    out = torch.tanh(0.6 * x + 0.0007 * t) + 0.05 * torch.cos(3 * x)
    if channels is not None:  # learned variance: (prediction, variance) along channels
        out = torch.cat([out, 0.5 + 0.4 * torch.tanh(x[:, :channels] - 0.001 * t)], dim=1)
    return out


def _pair(name, config):
    return getattr(diffusers, name)(**config), getattr(fs, name)(**config)


def _x0_of(sched, out):
    x0 = getattr(out, "pred_original_sample", None)
    return sched.model_outputs[-1] if x0 is None else x0  # DPM-Solver keeps x0 in model_outputs


def run_trajectory(name, config, steps, step_kwargs=None, *, learned=False, shape=(2, 3, 8, 8),
                   seed=0):
    """Run both schedulers for a whole trajectory with the same fake model and
    generator seeds; assert every scaled input, prev_sample and x0 agree."""
    step_kwargs = step_kwargs or {}
    ref, ours = _pair(name, config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    assert ours.timesteps.dtype == ref.timesteps.dtype
    assert torch.equal(ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):
        assert torch.allclose(ours.sigmas.double(), ref.sigmas.double(), rtol=1e-6, atol=0)
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)
    assert ours.order == ref.order
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * ref.init_noise_sigma
    x_ref, x_ours = x.clone(), x.clone()
    takes_generator = "generator" in inspect.signature(ref.step).parameters
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(2)]
    for i, t in enumerate(ref.timesteps):
        in_ref, in_ours = ref.scale_model_input(x_ref, t), ours.scale_model_input(x_ours, t)
        assert max_rel_error(in_ours, in_ref) < TOL, (i, "scale_model_input")
        m_ref = fake_model(in_ref, t, shape[1] if learned else None)
        m_ours = fake_model(in_ours, t, shape[1] if learned else None)
        extra = [{"generator": g} if takes_generator else {} for g in gens]
        out_ref = ref.step(m_ref, t, x_ref, **step_kwargs, **extra[0])
        out_ours = ours.step(m_ours, t, x_ours, **step_kwargs, **extra[1])
        assert max_rel_error(out_ours.prev_sample, out_ref.prev_sample) < TOL, (i, float(t))
        assert max_rel_error(out_ours.pred_original_sample, _x0_of(ref, out_ref)) < TOL, (i, float(t))
        x_ref, x_ours = out_ref.prev_sample, out_ours.prev_sample


SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ZERO_SNR = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")

TRAJECTORIES = [
    # (class, config, steps, step kwargs)
    ("DDPMScheduler", {}, 12, {}),
    ("DDPMScheduler", dict(prediction_type="v_prediction", clip_sample=False, **ZERO_SNR), 15, {}),
    ("DDPMScheduler", dict(prediction_type="sample", variance_type="fixed_large",
                           timestep_spacing="linspace"), 12, {}),
    ("DDPMScheduler", dict(thresholding=True, sample_max_value=1.5, variance_type="fixed_small_log",
                           beta_schedule="squaredcos_cap_v2"), 12, {}),
    ("DDPMScheduler", dict(beta_schedule="sigmoid", steps_offset=1, clip_sample_range=2.0), 10, {}),
    ("DDIMScheduler", {}, 12, {}),
    ("DDIMScheduler", dict(set_alpha_to_one=False, prediction_type="sample", timestep_spacing="linspace"),
     12, dict(eta=0.5, use_clipped_model_output=True)),
    ("DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False, **ZERO_SNR, **SD), 15,
     dict(eta=1.0)),
    ("DDIMScheduler", dict(thresholding=True, steps_offset=1), 10, dict(eta=0.3)),
    ("EulerDiscreteScheduler", {}, 12, {}),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", **ZERO_SNR), 15, {}),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, **SD), 12, dict(s_churn=1.0)),
    ("EulerDiscreteScheduler", dict(use_exponential_sigmas=True, final_sigmas_type="sigma_min",
                                    timestep_spacing="leading", steps_offset=1), 12, {}),
    ("EulerDiscreteScheduler", dict(prediction_type="sample", interpolation_type="log_linear"), 12,
     dict(s_churn=0.5, s_tmin=0.5, s_tmax=10.0, s_noise=1.003)),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous", prediction_type="v_prediction"), 10, {}),
    ("HeunDiscreteScheduler", {}, 10, {}),
    ("HeunDiscreteScheduler", dict(use_karras_sigmas=True, prediction_type="v_prediction",
                                   clip_sample=True, clip_sample_range=2.0), 10, {}),
    ("HeunDiscreteScheduler", dict(prediction_type="sample", timestep_spacing="trailing", **SD), 10, {}),
    ("HeunDiscreteScheduler", dict(beta_schedule="exp", timestep_spacing="leading"), 10, {}),
    ("EDMEulerScheduler", {}, 12, {}),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", prediction_type="v_prediction",
                               final_sigmas_type="sigma_min"), 12, dict(s_churn=2.0)),
    ("DPMSolverMultistepScheduler", {}, 12, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, **SD), 12, {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min",
                                         lower_order_final=False), 20, {}),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction",
                                         timestep_spacing="trailing"), 20, {}),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun", prediction_type="sample", thresholding=True,
                                         timestep_spacing="leading", steps_offset=1), 12, {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), 12, {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3,
                                         solver_type="heun", use_exponential_sigmas=True), 20, {}),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True, euler_at_final=True,
                                         lambda_min_clipped=-5.1), 12, {}),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="zero", **ZERO_SNR), 16, {}),
]


@pytest.mark.parametrize(
    "name, config, steps, step_kwargs", TRAJECTORIES,
    ids=[f"{n[:-9]}-{i}" for i, (n, *_rest) in enumerate(TRAJECTORIES)],
)
def test_trajectory_matches_diffusers(name, config, steps, step_kwargs):
    run_trajectory(name, config, steps, step_kwargs)


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "triton"])
def test_trajectories_on_every_cpu_backend(backend):
    """The schedulers only call the op: whichever backend runs it, the numbers hold."""
    with use_backend(backend):
        run_trajectory("DDPMScheduler", dict(thresholding=True), 8)
        run_trajectory("DPMSolverMultistepScheduler",
                       dict(solver_order=3, algorithm_type="sde-dpmsolver++"), 16)
        run_trajectory("HeunDiscreteScheduler", dict(clip_sample=True), 6)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_ddpm_learned_variance_matches_diffusers(variance_type):
    run_trajectory("DDPMScheduler", dict(variance_type=variance_type), 10, learned=True)


def test_dpm_learned_variance_output_is_sliced_like_diffusers():
    run_trajectory("DPMSolverMultistepScheduler", dict(variance_type="learned_range"), 10, learned=True)


def test_scaled_beta_sigmas_match_diffusers():
    pytest.importorskip("scipy")
    run_trajectory("EulerDiscreteScheduler", dict(use_beta_sigmas=True), 10)


def test_ddpm_custom_timesteps_match_diffusers():
    ref, ours = _pair("DDPMScheduler", {})
    steps = [900, 700, 420, 99, 3, 0]
    ref.set_timesteps(timesteps=steps)
    ours.set_timesteps(timesteps=steps)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x_ours = x
    g_ref, g_ours = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in steps:
        x_ref = ref.step(fake_model(x_ref, t), t, x_ref, generator=g_ref).prev_sample
        x_ours = ours.step(fake_model(x_ours, t), t, x_ours, generator=g_ours).prev_sample
        assert max_rel_error(x_ours, x_ref) < TOL


def test_ddpm_without_set_timesteps_steps_to_t_minus_one():
    ref, ours = _pair("DDPMScheduler", dict(prediction_type="v_prediction"))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in (999, 500, 1, 0):
        expected = ref.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(t))
        got = ours.step(fake_model(x, t), t, x, generator=torch.Generator().manual_seed(t))
        assert max_rel_error(got.prev_sample, expected.prev_sample) < TOL


def test_heun_sample_prediction_is_at_least_as_accurate_as_diffusers_when_ill_conditioned():
    """With σ_max ~ 2e4 (cosine schedule, trailing), diffusers' fp32 Heun loses digits
    to cancellation; fastdiff is compared with diffusers run in float64 instead."""
    config = dict(prediction_type="sample", timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2")
    ref32, ours = _pair("HeunDiscreteScheduler", config)
    ref64 = diffusers.HeunDiscreteScheduler(**config)
    for s in (ref32, ours, ref64):
        s.set_timesteps(8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * ref32.init_noise_sigma
    xs = [x.clone(), x.clone(), x.double()]
    for t in ref32.timesteps:
        xs = [s.step(fake_model(s.scale_model_input(xi, t), t), t, xi).prev_sample
              for s, xi in zip((ref32, ours, ref64), xs)]
    assert max_rel_error(xs[1], xs[2]) <= max_rel_error(xs[0], xs[2])


# --------------------------------------------------------------------------
# add_noise, get_velocity, begin index, per-sample timesteps, outputs
# --------------------------------------------------------------------------

NAMES = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
         "EDMEulerScheduler", "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_matches_diffusers(name):
    ref, ours = _pair(name, {})
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = ref.timesteps[[0, 4, -1]]
    assert max_rel_error(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-6
    if name not in ("DDPMScheduler", "DDIMScheduler"):  # σ looked up by the begin index
        ref.set_begin_index(3)
        ours.set_begin_index(3)
        assert max_rel_error(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t)) < 1e-6


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler"])
def test_get_velocity_matches_diffusers(name):
    ref, ours = _pair(name, {})
    ref.set_timesteps(10)
    ours.set_timesteps(10)
    x0 = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    t = ref.timesteps[[0, 4, -1]]
    assert max_rel_error(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t)) < 1e-6


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "HeunDiscreteScheduler",
                                  "DPMSolverMultistepScheduler"])
def test_begin_index_starts_mid_schedule_like_diffusers(name):
    ref, ours = _pair(name, {})
    for s in (ref, ours):
        s.set_timesteps(10)
        s.set_begin_index(4)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_ref = x_ours = x
    for t in ref.timesteps[4:]:
        x_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t), t), t, x_ref).prev_sample
        x_ours = ours.step(fake_model(ours.scale_model_input(x_ours, t), t), t, x_ours).prev_sample
    assert ours.step_index == ref.step_index
    assert max_rel_error(x_ours, x_ref) < TOL


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_per_sample_timesteps_equal_separate_calls(name):
    sched = getattr(fs, name)()
    sched.set_timesteps(20)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    t = sched.timesteps[[0, 9, -1]]
    m = fake_model(x, 0)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    batched = sched.step(m, t, x, generator=gens)
    for i in range(3):
        single = sched.step(m[i:i + 1], int(t[i]), x[i:i + 1], generator=torch.Generator().manual_seed(i))
        assert max_rel_error(batched.prev_sample[i:i + 1], single.prev_sample) < 1e-6
        assert max_rel_error(batched.pred_original_sample[i:i + 1], single.pred_original_sample) < 1e-6


def test_return_dict_false_gives_tuples_like_diffusers():
    x = torch.randn(2, 3, 8, 8)
    for name, expected_len in (("DDIMScheduler", 2), ("DPMSolverMultistepScheduler", 1)):
        sched = getattr(fs, name)()
        sched.set_timesteps(10)
        t = sched.timesteps[0]
        out = sched.step(fake_model(x, t), t, x, return_dict=False)
        assert isinstance(out, tuple) and len(out) == expected_len
    sched = fs.DDIMScheduler()
    sched.set_timesteps(10)
    out = sched.step(fake_model(x, 0), sched.timesteps[0], x)
    assert out[0] is out.prev_sample and out["pred_original_sample"] is out.pred_original_sample


# --------------------------------------------------------------------------
# In-kernel noise (no generator)
# --------------------------------------------------------------------------


def _noisy_run(sched, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    sched.set_timesteps(8)
    x = torch.ones(2, 3, 8, 8)
    for t in sched.timesteps:
        x = sched.step(fake_model(x, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("make", [fs.DDPMScheduler, lambda: fs.DPMSolverMultistepScheduler(
    algorithm_type="sde-dpmsolver++")], ids=["ddpm", "sde-dpmsolver++"])
def test_in_kernel_noise_is_seeded_and_reproducible(make):
    a, b, c = _noisy_run(make(), 3), _noisy_run(make(), 3), _noisy_run(make(), 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    d, e = _noisy_run(make().manual_seed(11)), _noisy_run(make().manual_seed(11))
    assert torch.equal(d, e)
    sched = make().manual_seed(11)  # the stream goes on across trajectories, like a generator
    assert not torch.equal(_noisy_run(sched), _noisy_run(sched))


def test_in_kernel_noise_is_standard_normal():
    sched = fs.DDIMScheduler()
    sched.set_timesteps(10)
    t = int(sched.timesteps[2])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    m = fake_model(x, t)
    noisy = sched.step(m, t, x, eta=1.0).prev_sample
    mean = sched.step(m, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
    ab, ab_prev = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[t - 100].double()
    std = ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    z = (noisy - mean).double() / std
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.03


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------

CONFIGS = {
    "DDPMScheduler": dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
    "DDIMScheduler": dict(set_alpha_to_one=False, timestep_spacing="trailing", **SD),
    "EulerDiscreteScheduler": dict(use_karras_sigmas=True, sigma_min=0.03),
    "HeunDiscreteScheduler": dict(clip_sample=True, timestep_spacing="leading"),
    "EDMEulerScheduler": dict(sigma_data=1.0, rho=5.0),
    "DPMSolverMultistepScheduler": dict(solver_order=3, algorithm_type="sde-dpmsolver++"),
}


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trips_with_diffusers(name, caplog):
    theirs = getattr(diffusers, name)(**CONFIGS[name])
    with caplog.at_level(logging.WARNING, logger="fastdiff.schedulers"):
        ours = getattr(fs, name).from_config(theirs.config)
    assert not caplog.records  # _class_name / _use_default_values / ... are tolerated silently
    assert _public(ours.config) == _public(theirs.config)
    assert set(ours.config["_use_default_values"]) == set(theirs.config["_use_default_values"])
    assert ours.config.prediction_type == theirs.config.prediction_type  # attribute access
    back = getattr(diffusers, name).from_config(ours.config)
    assert _public(back.config) == _public(theirs.config)
    assert getattr(fs, name)(**CONFIGS[name]).config == ours.config


def test_from_config_across_classes_matches_diffusers():
    source = diffusers.DDPMScheduler(variance_type="fixed_large", **SD)
    theirs = diffusers.DDIMScheduler.from_config(source.config, timestep_spacing="trailing")
    ours = fs.DDIMScheduler.from_config(source.config, timestep_spacing="trailing")
    assert _public(ours.config) == _public(theirs.config)  # variance_type kept as a hidden key
    back = fs.DDPMScheduler.from_config(ours.config)
    assert back.config.variance_type == "fixed_large" and back.config.beta_schedule == "scaled_linear"


def test_from_config_ignores_unknown_keys_with_a_warning(caplog):
    config = {**fs.DDIMScheduler().config, "_diffusers_version": "0.42.1", "no_such_key": 1}
    with caplog.at_level(logging.WARNING, logger="fastdiff.schedulers"):
        sched, unused = fs.DDIMScheduler.from_config(config, return_unused_kwargs=True, eta_typo=2)
    assert "no_such_key" in caplog.text and "_diffusers_version" not in caplog.text
    assert unused == {"no_such_key": 1, "eta_typo": 2}
    assert sched.config.num_train_timesteps == 1000


def test_config_is_frozen_and_picklable():
    import copy
    import pickle

    sched = fs.DPMSolverMultistepScheduler(solver_order=3)
    with pytest.raises(TypeError):
        sched.config["solver_order"] = 1
    with pytest.raises(TypeError):
        sched.config.solver_order = 1
    assert pickle.loads(pickle.dumps(sched.config)) == sched.config
    assert copy.deepcopy(sched).config.solver_order == 3


# --------------------------------------------------------------------------
# diffusers pipelines
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


@pytest.mark.parametrize("pipeline, kwargs", [
    ("DDPMPipeline", dict(num_inference_steps=6)),
    ("DDIMPipeline", dict(num_inference_steps=6, eta=0.7)),
    ("DDIMPipeline", dict(num_inference_steps=5, eta=0.0, use_clipped_model_output=True)),
])
def test_fastdiff_scheduler_in_a_diffusers_pipeline(tiny_unet, pipeline, kwargs):
    scheduler_name = "DDPMScheduler" if pipeline == "DDPMPipeline" else "DDIMScheduler"
    pipe = getattr(diffusers, pipeline)(unet=tiny_unet,
                                        scheduler=getattr(diffusers, scheduler_name)(**SD))
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    with torch.no_grad():
        expected = pipe(batch_size=2, generator=gens(), output_type="np", **kwargs).images
        pipe.scheduler = getattr(fs, scheduler_name).from_config(pipe.scheduler.config)
        got = pipe(batch_size=2, generator=gens(), output_type="np", **kwargs).images
    assert isinstance(pipe.scheduler, getattr(fs, scheduler_name))
    assert abs(got - expected).max() < TOL


# --------------------------------------------------------------------------
# Invalid arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name, kwargs, argument, choices", [
    ("DDPMScheduler", dict(prediction_type="eps"), "prediction_type", "'epsilon', 'sample'"),
    ("DDPMScheduler", dict(variance_type="fixed_large_log"), "variance_type", "'fixed_small'"),
    ("DDPMScheduler", dict(beta_schedule="cosine"), "beta_schedule", "'squaredcos_cap_v2'"),
    ("DDIMScheduler", dict(timestep_spacing="uniform"), "timestep_spacing", "'leading'"),
    ("EulerDiscreteScheduler", dict(interpolation_type="cubic"), "interpolation_type", "'log_linear'"),
    ("EulerDiscreteScheduler", dict(final_sigmas_type="one"), "final_sigmas_type", "'sigma_min'"),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, use_exponential_sigmas=True),
     "use_karras_sigmas", "only one of"),
    ("HeunDiscreteScheduler", dict(prediction_type="flow"), "prediction_type", "'v_prediction'"),
    ("EDMEulerScheduler", dict(sigma_schedule="linear"), "sigma_schedule", "'karras', 'exponential'"),
    ("EDMEulerScheduler", dict(prediction_type="sample"), "prediction_type", "'epsilon', 'v_prediction'"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver"), "algorithm_type", "'dpmsolver++'"),
    ("DPMSolverMultistepScheduler", dict(solver_order=4), "solver_order", "1, 2, 3"),
    ("DPMSolverMultistepScheduler", dict(solver_type="bh2"), "solver_type", "'midpoint', 'heun'"),
    ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True), "use_flow_sigmas", "valid: False"),
])
def test_invalid_constructor_arguments_are_named(name, kwargs, argument, choices):
    with pytest.raises(ValueError, match=argument) as info:
        getattr(fs, name)(**kwargs)
    assert choices in str(info.value)


def test_invalid_call_arguments_are_named():
    ddim = fs.DDIMScheduler()
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(x, 10, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim.set_timesteps(1001)
    ddim.set_timesteps(10)
    with pytest.raises(ValueError, match="eta"):
        ddim.step(x, 900, x, eta=-1.0)
    with pytest.raises(ValueError, match="timestep"):
        ddim.step(x, 1000, x)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        ddim.step(x, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    euler = fs.EulerDiscreteScheduler()
    euler.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        euler.step(x, 3, x)
    with pytest.raises(ValueError, match="config"):
        fs.DDPMScheduler.from_config("google/ddpm-cifar10-32")
    with pytest.raises(ValueError, match="seed"):
        fs.DDPMScheduler().manual_seed(1.5)


# --------------------------------------------------------------------------
# No host sync in step (CUDA only: sync debug mode raises on a synchronising call)
# --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_step_does_not_synchronize(name):
    config = dict(algorithm_type="sde-dpmsolver++") if name.startswith("DPM") else {}
    sched = getattr(fs, name)(**config)
    sched.set_timesteps(6, device="cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    kwargs = dict(eta=1.0) if name == "DDIMScheduler" else {}
    kwargs.update(dict(s_churn=1.0) if name in ("EulerDiscreteScheduler", "EDMEulerScheduler") else {})
    timesteps = list(sched.timesteps)  # device scalars, as a pipeline iterates them
    t = timesteps[0]
    x = sched.step(torch.tanh(sched.scale_model_input(x, t)), t, x, **kwargs).prev_sample  # warm-up
    with no_cuda_sync():
        for t in timesteps[1:]:
            x = sched.step(torch.tanh(sched.scale_model_input(x, t)), t, x, **kwargs).prev_sample
    assert torch.isfinite(x).all()


# --------------------------------------------------------------------------
# Device timesteps read on the host (no index tensor, no range check, no sync)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_elements_of_device_timesteps_are_read_on_the_host(name):
    """``for t in scheduler.timesteps`` on a device: each t (a view) maps to its host
    value through its storage offset; anything else -- a slice of several timesteps,
    another dtype, timesteps modified in place or replaced -- is not read."""
    sched = getattr(fs, name)()
    sched.set_timesteps(10)
    ts = sched.timesteps.numpy().copy()
    sched._set_timesteps_tensor(ts, "meta")  # a device tensor whose values cannot be read
    t = sched.timesteps
    assert [sched._host_timestep(v) for v in t] == ts.tolist()
    assert sched._host_timestep(t[3].reshape(-1).expand(4)) == ts[3]  # a batch of one timestep
    assert sched._host_timestep(t[3:4]) == ts[3]
    assert sched._host_timestep(t[2:5]) is None
    assert sched._host_timestep(t[3].to(torch.int32)) is None
    assert sched._host_timestep(torch.tensor(int(ts[3]))) is None  # CPU: read as usual
    t[0] = 5  # in place: the host copy may be stale
    assert sched._host_timestep(t[3]) is None
    sched._set_timesteps_tensor(ts, "meta")
    old = sched.timesteps
    sched.timesteps = old.clone()
    assert sched._host_timestep(old[3]) is None
    with torch.inference_mode():
        sched._set_timesteps_tensor(ts, "meta")
    assert sched._host_timestep(sched.timesteps[3]) is None


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_device_timestep_steps_take_the_host_row(name, monkeypatch):
    """A step with t from scheduler.timesteps on CUDA reads a host row: no index tensor,
    so no device-side range check (and, for DDPM, no sync to decide on noise); the
    result equals the step with t as a Python int."""
    import importlib

    op = importlib.import_module("fastdiff.ops.sampler_step")  # the module (the package exports the op)
    sched = getattr(fs, name)()
    sched.set_timesteps(10, device="cuda")
    x = torch.randn(2, 3, 8, 8, device="cuda")
    eps = torch.randn_like(x)
    calls = []
    real = op._check_index_values
    monkeypatch.setattr(op, "_check_index_values", lambda index, rows: calls.append(index) or real(index, rows))
    t = sched.timesteps[4]
    got = sched.step(eps, t, x, generator=torch.Generator("cuda").manual_seed(0)).prev_sample
    assert all(i is None for i in calls)
    expected = sched.step(eps, int(t), x, generator=torch.Generator("cuda").manual_seed(0)).prev_sample
    assert torch.equal(got, expected)
    assert sched._host_timestep(torch.tensor(int(t), device="cuda")) is None  # equal value, other memory
