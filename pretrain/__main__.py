import sys
import warnings

# megatron-core announces at import, on every rank, that it falls back from Apex/Transformer Engine,
# which this project does not use.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")

from pretrain.train import main  # noqa: E402

sys.exit(main())
