"""``python -m invint_hub.train STAGE ...`` and ``accelerate launch -m invint_hub.train STAGE ...``."""
from .cli import main

main()
