"""Every file and key name uckpt reads or writes, in one place.

DeepSpeed's own constants are re-exported where they exist, so the meaning of a key is the one
DeepSpeed gives it; only names DeepSpeed has no constant for are spelled here.
"""
import importlib.util
import os
import sys


def _deepspeed_constants():
    """DeepSpeed's ``deepspeed/checkpoint/constants.py``, loaded on its own.

    Importing it through its package runs ``deepspeed/__init__``, which imports torch and the
    whole runtime (about 3 s); the constants file imports nothing, so the converter loads just it.
    Where DeepSpeed is imported already, its module is the one used."""
    name = "deepspeed.checkpoint.constants"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("deepspeed")
    if spec is None or not spec.origin:
        raise ImportError("uckpt needs DeepSpeed installed: pip install deepspeed==0.19.8")
    path = os.path.join(os.path.dirname(spec.origin), "checkpoint", "constants.py")
    spec = importlib.util.spec_from_file_location("_uckpt_deepspeed_checkpoint_constants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_DS = _deepspeed_constants()
BASE_OPTIMIZER_STATE = _DS.BASE_OPTIMIZER_STATE
BF16_ZERO_FILE_PREFIX = _DS.BF16_ZERO_FILE_PREFIX
BUFFER_NAMES = _DS.BUFFER_NAMES
CAT_DIM = _DS.CAT_DIM
CHECKPOINT_PARALLEL_DIMS = _DS.CHECKPOINT_PARALLEL_DIMS
CHECKPOINT_PP_DEGREE = _DS.CHECKPOINT_PP_DEGREE
CHECKPOINT_TP_DEGREE = _DS.CHECKPOINT_TP_DEGREE
DS_VERSION = _DS.DS_VERSION
FP16_ZERO_FILE_PREFIX = _DS.FP16_ZERO_FILE_PREFIX
FP32_FLAT_GROUPS = _DS.FP32_FLAT_GROUPS
FP32_WEIGHT_KEY = _DS.FP32_WEIGHT_KEY
FROZEN_PARAM_FRAGMENTS = _DS.FROZEN_PARAM_FRAGMENTS
FROZEN_PARAM_SHAPES = _DS.FROZEN_PARAM_SHAPES
GROUP_PADDINGS = _DS.GROUP_PADDINGS
LAYER_FILE_PREFIX = _DS.LAYER_FILE_PREFIX
MODEL_FILE_PREFIX = _DS.MODEL_FILE_PREFIX
MODEL_FILE_SUFFIX = _DS.MODEL_FILE_SUFFIX
OPTIM_FILE_SUFFIX = _DS.OPTIM_FILE_SUFFIX
OPTIMIZER_STATE_DICT = _DS.OPTIMIZER_STATE_DICT
PARAM = _DS.PARAM
PARAM_GROUPS = _DS.PARAM_GROUPS
PARAM_SHAPES = _DS.PARAM_SHAPES
PARAM_SLICE_MAPPINGS = _DS.PARAM_SLICE_MAPPINGS
PARTITION_COUNT = _DS.PARTITION_COUNT
PIPELINE_REPLICATED_PARAMETER_PATTERNS = _DS.PIPELINE_REPLICATED_PARAMETER_PATTERNS
SINGLE_PARTITION_OF_FP32_GROUPS = _DS.SINGLE_PARTITION_OF_FP32_GROUPS
UNIVERSAL_CHECKPOINT_INFO = _DS.UNIVERSAL_CHECKPOINT_INFO
UNIVERSAL_CHECKPOINT_VERSION_KEY = _DS.UNIVERSAL_CHECKPOINT_VERSION_KEY
UNIVERSAL_CHECKPOINT_VERSION_VALUE = _DS.UNIVERSAL_CHECKPOINT_VERSION_VALUE
AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS = _DS.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS
AFFINE_MAP = _DS.AFFINE_MAP
ORIGINAL_VOCAB_SIZE = _DS.ORIGINAL_VOCAB_SIZE
PARAM_N_SUB_PARAMS = _DS.PARAM_N_SUB_PARAMS
SUB_PARAM_SHAPE = _DS.SUB_PARAM_SHAPE
SUB_PARAM_SHARD_WIDTHS = _DS.SUB_PARAM_SHARD_WIDTHS
VOCAB_TENSOR = _DS.VOCAB_TENSOR
PARAMETER_TO_AVERAGE_PATTERNS = _DS.PARAMETER_TO_AVERAGE_PATTERNS
PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0 = _DS.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0
PARAMETER_WITH_ROW_PARALLELISM_PATTERNS = _DS.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS
PARAMETER_WITH_SUB_PARAMS = _DS.PARAMETER_WITH_SUB_PARAMS
TP_REPLICATED_PARAMETER_PATTERNS = _DS.TP_REPLICATED_PARAMETER_PATTERNS
VOCABULARY_PARAMETER_PATTERNS = _DS.VOCABULARY_PARAMETER_PATTERNS
AUTOEP_LAYERS_KEY = _DS.AUTOEP_LAYERS_KEY
AUTOEP_LAYERS_KEY_LEGACY = _DS.AUTOEP_LAYERS_KEY_LEGACY
DS_AUTOEP_UC_META = _DS.DS_AUTOEP_UC_META
DS_AUTOTP_UC_META = _DS.DS_AUTOTP_UC_META
EP_IS_EXPERT_PARAM = _DS.EP_IS_EXPERT_PARAM
EP_NUM_EXPERTS = _DS.EP_NUM_EXPERTS
AUTOEP_EXPERT_KEY_PREFIX = _DS.AUTOEP_EXPERT_KEY_PREFIX
AUTOEP_NUM_EXPERTS = _DS.AUTOEP_NUM_EXPERTS
AUTOEP_EP_SIZE = _DS.AUTOEP_EP_SIZE
AUTOEP_NUM_LOCAL_EXPERTS = _DS.AUTOEP_NUM_LOCAL_EXPERTS
AUTOEP_EXPERT_PLACEMENT = _DS.AUTOEP_EXPERT_PLACEMENT
AUTOEP_PLACEMENT_EXPERTS = _DS.AUTOEP_PLACEMENT_EXPERTS
AUTOEP_PLACEMENT_RANK = _DS.AUTOEP_PLACEMENT_RANK
AUTOEP_PLACEMENT_RANKS = _DS.AUTOEP_PLACEMENT_RANKS
AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY = _DS.AUTOEP_ZERO3_EXPERT_STATE_FORMAT_KEY
AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT = _DS.AUTOEP_ZERO3_PARTITIONED_EXPERT_STATE_FORMAT
AUTOEP_ZERO12_REQUIRED_FIELDS = _DS.AUTOEP_ZERO12_REQUIRED_FIELDS
ZERO_FILE_PREFIX = _DS.ZERO_FILE_PREFIX
ZERO_STAGE = _DS.ZERO_STAGE

# universal_checkpoint_info keys whose patterns change how DeepSpeed merges a parameter (spec 2.4).
MERGE_RULE_KEYS = (
    AFFINE_MAP,
    TP_REPLICATED_PARAMETER_PATTERNS,
    PARAMETER_TO_AVERAGE_PATTERNS,
    PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
    PARAMETER_WITH_SUB_PARAMS,
    PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    VOCABULARY_PARAMETER_PATTERNS,
)

# Keys DeepSpeed uses without a named constant.
USE_DATA_BEFORE_EXPERT_PARALLELISM = "use_data_before_expert_parallelism"  # ds_config (deepspeed_checkpoint.py)
EXPERT_PARAMETER_PATTERNS = "expert_parameter_patterns"  # universal_checkpoint_info
# What DeepSpeed's converter writes as expert_parameter_patterns (spec 3.2; no leading '.*').
AUTOEP_UNIVERSAL_EXPERT_PATTERN = r"\.experts\.w[123]$"
# what its ZeRO-3 path writes (spec 3.3), and what an AutoEP save records at every stage
AUTOEP_ZERO3_EXPERT_PATTERN = r".*\.experts\.w[123]$"
MODULE_KEY = "module"  # model-state file: lp state_dict
SHARED_PARAMS_KEY = "shared_params"  # model-state file: {alias: canonical}
DS_CONFIG_KEY = "ds_config"
TORCH_STATE_KEY = "state"  # torch optimizer state_dict: per-group state
STEP_KEY = "step"
EXP_AVG_KEY = "exp_avg"
EXP_AVG_SQ_KEY = "exp_avg_sq"
ZERO3_PARTITION_GROUPS_KEY = "ds_zero_partition_groups"
ZERO3_PARTITION_COUNT_KEY = "partition_count"
ZERO3_PARTITION_RANK_KEY = "partition_rank"

# The states a Universal parameter folder holds (besides step), in DeepSpeed's write order.
TENSOR_STATES = (FP32_WEIGHT_KEY, EXP_AVG_KEY, EXP_AVG_SQ_KEY)
# The optimizer state keys DeepSpeed's converter extracts (spec section 6: others are dropped).
MOMENT_STATES = (EXP_AVG_KEY, EXP_AVG_SQ_KEY)

# Universal checkpoint layout.
UNIVERSAL_ZERO_FOLDER = "zero"
UNIVERSAL_OPTIMIZER_STATE_FILE = "optimizer_state.pt"
LATEST_UNIVERSAL_FILE = "latest_universal"
LATEST_FILE = "latest"
STATE_FILE_SUFFIX = ".pt"

# uckpt's own files.
REPORT_FILE = "uckpt_report.json"
PARTIAL_SUFFIX = ".uckpt-partial"  # output is built in <output><suffix> and renamed when complete
