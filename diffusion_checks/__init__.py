"""Exercise checks: each lesson's exercises are followed by a call such as
``check_q_sample(q_sample)``.

The machinery shared by every check is in ``_core`` (its docstring says what a check
does); each lesson's checks are in a module of their own, ``lesson01``, ``lesson02``, ...
Everything a notebook needs is importable from here: ``from diffusion_checks import
check_q_sample``.
"""
from diffusion_checks._core import (  # noqa: F401
    BROADCAST_HINT, DEVICE_HINT, NOT_ATTEMPTED_MARK, PASSED_MARK, call, call_pure, changed, close,
    compare, exercise_check, expect_finite, expect_float, expect_tensor, fail, largest_difference,
    near, other_device, passed, probe_device, same_values, snapshot, to_device, yours_if_passed)
from diffusion_checks.lesson01 import (check_alpha_bars, check_cosine_beta_schedule,  # noqa: F401
                                       check_linear_beta_schedule, check_q_posterior,
                                       check_q_sample, check_sigmoid_beta_schedule)
from diffusion_checks.lesson02 import (check_res_block, check_self_attention,  # noqa: F401
                                       check_sinusoidal_embedding, check_unet_forward)
from diffusion_checks.lesson03 import (check_ddpm_step, check_diffusion_loss,  # noqa: F401
                                       check_ema_update, check_train_step)
from diffusion_checks.lesson04 import (check_attribute_embedding,  # noqa: F401
                                       check_attribute_vector, check_cross_attention,
                                       check_drop_condition)
from diffusion_checks.lesson05 import (check_ddim_invert, check_ddim_step,  # noqa: F401
                                       check_ddim_timesteps, check_score_from_eps, check_slerp)
from diffusion_checks.lesson06 import (check_causal_mask, check_contrastive_loss,  # noqa: F401
                                       check_patchify, check_zero_shot_scores)
from diffusion_checks.lesson07 import (check_gaussian_kl, check_latent_scale,  # noqa: F401
                                       check_reparameterize, check_vae_loss)
from diffusion_checks.lesson08 import (check_cfg_eps, check_drop_captions,  # noqa: F401
                                       check_img2img_start, check_inpaint_blend)
from diffusion_checks.lesson09 import (check_classifier_log_prob_grad,  # noqa: F401
                                       check_clip_guided_eps, check_guided_eps)
