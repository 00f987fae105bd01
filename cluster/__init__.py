"""How stages run and where their files live: storage through fsspec, Ray, DeepSpeed."""
