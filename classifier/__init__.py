"""WindowKV's task classifier: labels a formatted LongBench prompt "qa" (information localisation) or "other".

`kvbench train-classifier` trains and saves it (`kvbench.classifier.train`);
`load_classifier()` gives the WindowKV method a `TaskClassifier` whose
``predict(prompt_text)`` answers "qa" or "other"; `checkpoint_digest()` names a
checkpoint by its content (sha256), for recording which classifier made a result.
"""

from kvbench.classifier.checkpoint import checkpoint_digest, default_checkpoint_path, load_classifier, save_checkpoint
from kvbench.classifier.model import EMBEDDED_ENCODER, LABELS, PromptReader, TaskClassifier

__all__ = ["EMBEDDED_ENCODER", "LABELS", "PromptReader", "TaskClassifier", "checkpoint_digest", "default_checkpoint_path",
           "load_classifier", "save_checkpoint"]
