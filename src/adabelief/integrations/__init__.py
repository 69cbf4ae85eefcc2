"""Recipes for the training frameworks users already have: timm, Hugging Face, Lightning.

Each submodule imports only its own framework, and only when you import it;
``import adabelief`` imports none of them. The ``integrations`` extra installs the frameworks.

* ``adabelief.integrations.timm``: importing it registers ``adabelief.AdaBelief`` in
  timm's optimizer factory as ``"adabelief.AdaBelief"``.
* ``adabelief.integrations.huggingface``: ``optimizer_cls_and_kwargs(args, **options)`` for
  ``transformers.Trainer``. It takes the learning rate and the betas from ``TrainingArguments``;
  with ``step_in_backward=True`` it follows the Trainer's gradient accumulation and refuses its
  gradient clipping (``follow_gradient_accumulation`` does the former for a ready optimizer).
* ``adabelief.integrations.lightning``: the ``StepInBackward`` callback, for an in-backward
  AdaBelief with ``accumulate_grad_batches > 1``.

Lightning needs no adapter otherwise: return ``adabelief.AdaBelief`` from
``configure_optimizers``, or pass ``--optimizer adabelief.AdaBelief`` to ``LightningCLI`` (see
the documentation's "timm, Hugging Face, Lightning" page).
"""
