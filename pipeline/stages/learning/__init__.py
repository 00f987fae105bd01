"""SoCo's learn stage in parts: its config section, the typed job the workers get, the
teacher cache, the trainer and the finalisation (selection and folding)."""
