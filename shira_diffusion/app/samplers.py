"""The samplers artists know by their A1111 names, built from the loaded scheduler's own config
(so the model's beta schedule, prediction type and timestep spacing carry over)."""

from __future__ import annotations

from typing import Any

DEFAULT = "model default"

# name -> (diffusers scheduler class, config overrides)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
NAMES = (DEFAULT, *SAMPLERS)


class Samplers:
    """One scheduler object per sampler name for a pipeline, made on first use from the
    pipeline's original scheduler config; :meth:`use` puts one on the pipeline (call it under the
    generation lock: the scheduler is the pipeline's state)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.default = pipe.scheduler
        self._made: dict[str, Any] = {DEFAULT: pipe.scheduler}

    def get(self, name: str | None):
        name = name or DEFAULT
        if name not in self._made:
            if name not in SAMPLERS:
                raise ValueError(f"unknown sampler {name!r}; one of {', '.join(NAMES)}")
            import diffusers

            cls, overrides = SAMPLERS[name]
            self._made[name] = getattr(diffusers, cls).from_config(self.default.config, **overrides)
        return self._made[name]

    def use(self, name: str | None, pipe=None) -> str:
        """Put ``name``'s scheduler on ``pipe`` (default: the main pipeline; img2img and inpainting
        pipelines built from it hold their own reference); returns the name to report (A1111's,
        or the default scheduler's class)."""
        (pipe or self.pipe).scheduler = self.get(name)
        return name if name and name != DEFAULT else type(self.default).__name__
