"""Code written into every checkpoint so that plain transformers can load it
(`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`): `modeling_soco.py`
is copied verbatim, with one generated line naming the base class (pipeline/checkpoint.py).
It imports only torch and transformers, never this project."""
