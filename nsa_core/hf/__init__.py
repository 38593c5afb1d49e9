"""nsa_core.hf: the NSA causal language model for Hugging Face transformers (the `hf` extra).

Importing it registers model type "nsa" with AutoConfig and AutoModelForCausalLM, so
`AutoModelForCausalLM.from_pretrained(dir)` loads a saved NSA model without trust_remote_code.
`nsa_core` itself never imports this package (nor transformers).
"""

try:
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError("nsa_core.hf needs transformers: pip install 'nsa[hf]'") from err

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from nsa_core.hf.configuration import NSALMConfig
from nsa_core.hf.convert_dense import convert_dense, dense_to_nsa
from nsa_core.hf.modeling import NSAForCausalLM, NSAModel, NSAPreTrainedModel

AutoConfig.register("nsa", NSALMConfig, exist_ok=True)
AutoModel.register(NSALMConfig, NSAModel, exist_ok=True)
AutoModelForCausalLM.register(NSALMConfig, NSAForCausalLM, exist_ok=True)

__all__ = ["NSALMConfig", "NSAModel", "NSAForCausalLM", "NSAPreTrainedModel", "convert_dense", "dense_to_nsa"]
