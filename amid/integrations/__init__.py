"""Integrations with training frameworks (import the submodule you need; each needs its framework).

- :mod:`amid.integrations.hf`: a ``compute_loss_func`` for the plain Hugging Face ``Trainer`` and the
  λ schedules / DistiLLM's adaptive student-generation controller as ``TrainerCallback`` s
  (``pip install transformers accelerate``).
- :mod:`amid.integrations.trl`: TRL's GKD and distillation trainers with amid's loss
  (``pip install trl``; the versions tested are pinned in the ``integrations`` extra).
"""
