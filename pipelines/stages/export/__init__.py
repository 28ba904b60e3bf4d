"""stage=export: a train_ldm output as a diffusers pipeline directory, registered in MLflow (``pyfunc_model``)."""
