"""The studio: a Gradio page over one loaded SDXL pipeline whose SHiRA adapters swap in place
(``shira studio`` once installed, ``python -m app`` from a checkout)."""
