"""``python -m lorakit ...`` (also what ``torchrun -m lorakit finetune ...`` runs)."""
import sys

from .cli import main

sys.exit(main())
