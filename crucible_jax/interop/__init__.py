"""Pretrained checkpoints from other frameworks (open_clip, Hugging Face CLIP/SigLIP) as crucible params."""
