"""The shira-studio web app: one loaded SDXL pipeline, SHiRA adapters swapped in place."""
