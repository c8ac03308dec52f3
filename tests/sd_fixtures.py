"""Tiny Stable Diffusion components with random weights, built from configs (no download): the SD tests
use them, and benchmarks/bench_sd.py times the same computation on them (or on SD 1.5's shapes)."""
import torch

from sftlib.common import UserError


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges (one token per character): no download needed."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def random_pipeline(size="tiny", cross_attention_dim=None, seed=0):
    """A StableDiffusionPipeline with random weights built from configs. tiny: 0.8M-parameter UNet, VAE
    downsampling x2; sd15: SD 1.5's shapes (UNet 859.5M, VAE 83.7M downsampling x8, CLIP ViT-L/14's text
    transformer, 85.5M with this byte-level vocabulary instead of CLIP's 49408 tokens)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    if size == "tiny":
        dim = cross_attention_dim or 32
        unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=dim, attention_head_dim=8, norm_num_groups=8)
        vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
        text = CLIPTextConfig(hidden_size=dim, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                              vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    elif size == "sd15":
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=512)
        text = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                              vocab_size=len(tok), bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        raise UserError(f"--size must be tiny or sd15, got {size!r}")
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)  # SD 1.5's scheduler settings
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tok,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(unet, rank, seed, scale=0.05):
    """A random LoRA for `unet` in diffusers' format (a stand-in few-step shortcut): peft state dict."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    u = copy.deepcopy(unet)
    u.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                  adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    state = get_peft_model_state_dict(u, adapter_name="x")
    return {"unet." + k: scale * torch.randn(v.shape, generator=g) for k, v in state.items()}
