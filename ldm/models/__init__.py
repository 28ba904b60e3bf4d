"""Model definitions and named presets: the first stage (KL and VQ autoencoders), the UNet and its τθ (text
encoders, class and layout conditioners), the image-conditioned tasks' inputs and the diffusers pipelines they
are exported as."""
