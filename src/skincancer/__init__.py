"""skincancer: melanoma vs benign dermoscopy classification by transfer learning (a research aid, not a device)."""

__version__ = "0.1.0"

NOTICE = (
    "Research aid only, not a medical device: it has not been clinically validated and must not be used to "
    "diagnose, treat or rule out skin cancer. See a dermatologist about any lesion that worries you."
)

from .config import TrainConfig, load_config  # noqa: E402
from .data import index_folder, index_isic_csv, load_manifest, save_manifest  # noqa: E402
from .evaluate import compare, evaluate  # noqa: E402
from .predict import Classifier, load_model  # noqa: E402
from .train import train  # noqa: E402

__all__ = [
    "NOTICE", "TrainConfig", "load_config", "index_folder", "index_isic_csv", "load_manifest", "save_manifest",
    "train", "evaluate", "compare", "load_model", "Classifier",
]
