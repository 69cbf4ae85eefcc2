"""Recipes for the training frameworks users already have: timm, Hugging Face, Lightning.

Each submodule imports only its own framework, and only when you import it;
``import adabelief`` imports none of them. Install them with ``pip install "adabelief[integrations]"``.

* :mod:`adabelief.integrations.timm`: importing it registers :class:`adabelief.AdaBelief` in
  timm's optimizer factory as ``"adabelief.AdaBelief"``.
* :mod:`adabelief.integrations.huggingface`: :func:`~adabelief.integrations.huggingface.optimizer_cls_and_kwargs`
  for ``transformers.Trainer``. It takes the learning rate and the betas from ``TrainingArguments``.

Lightning needs no adapter: return :class:`adabelief.AdaBelief` from ``configure_optimizers``,
or pass ``--optimizer adabelief.AdaBelief`` to ``LightningCLI`` (see the documentation's
"Training frameworks" page).
"""
