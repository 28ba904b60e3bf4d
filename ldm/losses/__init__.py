"""The first stage's training objective: reconstruction + regulariser + adversarial loss, and the LPIPS network it
uses. The diffusion objective is ``ldm.diffusion.objective``."""
