"""Configuration: structured OmegaConf schemas, YAML files and ``key=value`` overrides.

* :mod:`~lightning_distill.config.load`: the one loader every config goes through (:func:`load_schema`:
  defaults, YAML with its ``extends`` chain or a dict, overrides, then the same checks on every path),
  field choices (:func:`choice`), the errors that name a key and its valid neighbours;
* :mod:`~lightning_distill.config.run`: the run config (:class:`RunConfig`, :func:`load_config`,
  :func:`load_config_dict`);
* :mod:`~lightning_distill.config.commands`: the configs of ``bank build`` and ``teach``.

The benchmark YAML (:mod:`lightning_distill.lab.bench_config`) is read by the same loader.
"""

from lightning_distill.config.commands import (BankBuildConfig, BankDataSpec, BankInferenceConfig, BankModelSpec,
                                               BankOptions, BankPreprocessConfig, TeachConfig, TeachDataSpec, TeachLevels,
                                               TeachModelSpec, load_bank_build_config, load_teach_config)
from lightning_distill.config.load import (FREE_FORM, LAYOUTS, MODALITIES, MODEL_FORMATS, MR_NORMS, ON_MISSING, UNMAPPED, ConfigError,
                                           apply_overrides, check_choices, choice, choices_of, config_key, file_layers,
                                           flat_keys, load_schema, schema_help, to_dict)
from lightning_distill.config.run import (AccelConfig, BankConfig, CheckpointConfig, CMEDLConfig, DataConfig,
                                          DistillConfig, LossConfig, ModelConfig, NiftiConfig, OptimConfig, PhantomConfig,
                                          RunConfig, ShiftConfig, TransferConfig, check_trainer, is_baseline, load_config,
                                          load_config_dict, run_label)

__all__ = ["AccelConfig", "BankBuildConfig", "BankConfig", "BankDataSpec", "BankInferenceConfig", "BankModelSpec",
           "BankOptions", "BankPreprocessConfig", "CMEDLConfig", "CheckpointConfig", "ConfigError", "DataConfig",
           "DistillConfig", "FREE_FORM", "LAYOUTS", "LossConfig", "MODALITIES", "MODEL_FORMATS", "MR_NORMS", "ModelConfig",
           "NiftiConfig", "ON_MISSING", "OptimConfig", "PhantomConfig", "RunConfig", "ShiftConfig", "TeachConfig", "TeachDataSpec",
           "TeachLevels", "TeachModelSpec", "TransferConfig", "UNMAPPED", "apply_overrides", "check_choices",
           "check_trainer", "choice", "choices_of", "is_baseline", "config_key", "file_layers", "flat_keys", "load_bank_build_config",
           "load_config", "load_config_dict", "load_schema", "load_teach_config", "run_label", "schema_help", "to_dict"]
