# %% [markdown]
# # 11 — MoonViT: an image's journey into the language model
#
# Kimi K2.5 and later read pictures and video. A 400M-parameter vision transformer, **MoonViT-3D**,
# turns pixels into rows of the language model's input embeddings: one `<|media_pad|>` token in the
# prompt becomes as many rows as the picture has 28×28-pixel cells. Nothing about the language model
# changes; it simply sees a longer sequence.
#
# Code: [kimi_ref/media.py](../kimi_ref/media.py) (loading, resizing, padding and patching images; video
# frames, chunks and timestamps; the chat's image input), [kimi_ref/moonvit.py](../kimi_ref/moonvit.py)
# (tower, sd2_tpool, projector, splice), the float64 twins [kimi_ref/oracle/media.py](../kimi_ref/oracle/media.py) and
# [kimi_ref/oracle/moonvit.py](../kimi_ref/oracle/moonvit.py),
# tests [tests/test_media.py](../tests/test_media.py) and [tests/test_moonvit.py](../tests/test_moonvit.py).
# The model wires it in
# [kimi_ref/model.py](../kimi_ref/model.py) (`KimiForCausalLM.splice_media`).
#
# ```
# picture ─RGB─> NaViT resize (BICUBIC) ─> zero-pad to ×28 ─> (x/255 − 0.5)/0.5 ─> patches [N, 3, 14, 14]
#   VisionTower: Conv2d 14/14 + bicubic 64×64 pos-emb (+ time emb) ─> 27 pre-LN blocks with 2D RoPE ─> LN
#   sd2_tpool: mean over frames, group 2×2 neighbours ─> Projector: LN, 4608→4608, GELU, →7168
#   splice: each <|media_pad|> ─> (H/28)(W/28) rows
# ```

# %%
import dataclasses

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image, ImageDraw

from kimi_ref import media as preprocessing  # kimi_ref/media.py ("media" below is its config)
from kimi_ref import moonvit
from kimi_ref.config import fixture_path, load_config, tiny_config
from kimi_ref.oracle import moonvit as omoonvit
from show_code import show  # chapters/show_code.py: the current source of a function, with its file and lines

torch.set_grad_enabled(False)  # inference only in this chapter
real = load_config(fixture_path("kimi_k25"))
media = preprocessing.default_media_config()  # the shipped K2.5 preprocessor_config.json
print(f"patch {media.patch_size}, merge {media.merge_kernel_size}, in_patch_limit {media.in_patch_limit}, "
      f"per side {media.patch_limit_on_one_side}, mean/std {media.image_mean}/{media.image_std}")
print(f"tower: D {real.vision.hidden_size}, heads {real.vision.num_attention_heads} × {real.vision.head_dim}, "
      f"{real.vision.num_hidden_layers} blocks; projector -> {real.vision.text_hidden_size}")

# %% [markdown]
# ## A picture to follow
#
# No downloads: we draw one with Pillow — a sky, a sun, a house — 250 pixels wide and 170 tall.

# %%
def draw_picture(width: int = 250, height: int = 170) -> Image.Image:
    img = Image.new("RGB", (width, height), (135, 190, 235))
    d = ImageDraw.Draw(img)
    d.rectangle([0, int(height * 0.7), width, height], fill=(90, 160, 70))                 # grass
    d.ellipse([width * 0.72, height * 0.08, width * 0.9, height * 0.34], fill=(250, 210, 60))  # sun
    d.rectangle([width * 0.2, height * 0.42, width * 0.5, height * 0.78], fill=(200, 80, 60))  # house
    d.polygon([(width * 0.16, height * 0.44), (width * 0.35, height * 0.2), (width * 0.54, height * 0.44)],
              fill=(120, 60, 40))                                                             # roof
    d.rectangle([width * 0.31, height * 0.58, width * 0.39, height * 0.78], fill=(70, 40, 30))  # door
    return img


picture = draw_picture()
pixel_values, grid = preprocessing.preprocess(picture)
t, h, w = grid
print(f"{picture.size[0]}×{picture.size[1]} -> pixel_values {tuple(pixel_values.shape)}, grid_thw {grid}, "
      f"{preprocessing.tokens_per_image(*picture.size)} LLM tokens")

# %% [markdown]
# ## Resize, pad, patch
#
# The picture is small enough to keep its size (at most 16384 patches and 512 per side). It is then
# zero-padded on the right and bottom to a multiple of 28 pixels — patch 14 × merge 2 — and normalized
# with mean = std = 0.5, so the black padding becomes exactly **−1.0**. Below: the padded picture with
# its 14-pixel patch grid; the thick lines are the 2×2 groups that will become one LLM token each.

# %%
show(preprocessing.preprocess)
show(preprocessing._normalize_patchify)

# %%
padded = pixel_values.view(h, w, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, h * 14, w * 14)
print("padding value:", padded[:, -1, -1].tolist(), "  pixel range:", padded.min().item(), padded.max().item())

fig, ax = plt.subplots(figsize=(7, 5))
ax.imshow((padded.permute(1, 2, 0) * 0.5 + 0.5).numpy())
for x in range(0, w * 14 + 1, 14):
    ax.axvline(x - 0.5, color="white", lw=1.6 if x % 28 == 0 else 0.4)
for y in range(0, h * 14 + 1, 14):
    ax.axhline(y - 0.5, color="white", lw=1.6 if y % 28 == 0 else 0.4)
ax.add_patch(plt.Rectangle((-0.5, -0.5), picture.width, picture.height, fill=False, ec="red", lw=2))
ax.set_title(f"{w}×{h} patches of 14 px; {w // 2}×{h // 2} = {(w // 2) * (h // 2)} LLM tokens\n"
             "(red: the picture; outside it: padding, −1.0 after normalization)")
ax.axis("off"); plt.tight_layout(); plt.show()

# %% [markdown]
# A big photo is shrunk instead. The scale is the largest one ≤ 1 that keeps
# `scale² · (W//14)·(H//14) ≤ in_patch_limit` and each side ≤ 512 · 14 pixels; Pillow's BICUBIC filter
# does the resizing (it *is* the definition: the reference processor calls `PIL.Image.resize`).

# %%
show(preprocessing.resize_size)

# %%
for size in [(250, 170), (1920, 1080), (4000, 3000), (12000, 300), (300, 12000)]:
    new = preprocessing.resize_size(*size, media)
    g = preprocessing.padded_grid(*new, media)
    print(f"{size[0]:>6}×{size[1]:<6} -> {new[0]:>5}×{new[1]:<5} grid {g[0]:>3}×{g[1]:<3} "
          f"tokens {preprocessing.tokens_per_image(*size, media):>5}")

# %% [markdown]
# ## Tokens against resolution
#
# Tokens grow with the area, (W/28)(H/28), until the patch budget bites: 16384 patches are 4096 tokens,
# reached around 1800×1800 pixels for a square. After that every picture costs about the same — a little
# over 4096 (4200 for the 4000×3000 photo above), because the budget is checked *before* padding to 28
# and counts only the whole patches `W//14` of the original.

# %%
sides = np.unique(np.geomspace(14, 8000, 120).astype(int))
fig, ax = plt.subplots(figsize=(7, 4))
for aspect, label in [(1.0, "square"), (16 / 9, "16:9"), (4.0, "4:1 panorama")]:
    ax.plot(sides, [preprocessing.tokens_per_image(int(s * aspect), s, media) for s in sides], label=label)
ax.axhline(media.in_patch_limit / 4, color="gray", ls=":", label="in_patch_limit / 4")
ax.set_xscale("log"); ax.set_yscale("log")
ax.set_xlabel("picture height in pixels"); ax.set_ylabel("LLM tokens"); ax.legend()
ax.set_title("tokens per image vs resolution (K2.5 preprocessor)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Position information: an interpolated table and 2D RoPE
#
# MoonViT tells a patch where it is in two ways. First, a learnable 64×64 table of position vectors is
# resized bicubically to the picture's (h, w) grid and added to the patch embeddings. Second, inside
# attention, **2D RoPE** rotates q and k: of each head's 72 dims (36 pairs), even pairs turn with the
# patch's *column* and odd pairs with its *row*, at 18 frequencies `10000^(−4j/72)`. So q·k depends only
# on the 2D offset between two patches.

# %%
hd = real.vision.head_dim
freqs = 10000.0 ** (-np.arange(0, hd, 4) / hd)
angles = moonvit.rope_2d_angles([(1, 16, 16)], hd).numpy()  # [256 patches, 36 pairs]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].semilogy(freqs, "o-"); axes[0].set_xlabel("frequency index j"); axes[0].set_ylabel("radians per patch")
axes[0].set_title(f"the {len(freqs)} frequencies, shared by x and y")
axes[1].imshow(np.cos(angles[:, :12]).T, aspect="auto", cmap="RdBu", interpolation="nearest")
axes[1].set_yticks(range(12), [f"{'xy'[i % 2]}{i // 2}" for i in range(12)])
axes[1].set_xlabel("patch, row-major over a 16×16 grid"); axes[1].set_ylabel("pair")
axes[1].set_title("cos(angle) of the first 12 pairs:\nx pairs cycle along a row, y pairs once per row")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## The tower on a tiny config, against the float64 oracle
#
# The real tower has 27 blocks of width 1152; a tiny one (same code, `tiny_config`) runs in a blink. We
# give it random weights and check it against the slow, obvious float64 twin. The tower's forward:
# embed the patches, build the 2D rotary table, run the blocks with attention kept inside each image
# (`cu_seqlens`), a final LayerNorm. Then sd2_tpool merges each 2×2 group of patches into one row:

# %%
show(moonvit.VisionTower.forward)
show(moonvit.sd2_tpool)

# %%
tiny = tiny_config(real).vision
small_media = dataclasses.replace(media, in_patch_limit=64, patch_limit_on_one_side=16)
torch.manual_seed(0)
tower, projector = moonvit.VisionTower(tiny), moonvit.Projector(tiny)
pv, g = preprocessing.preprocess(picture, small_media)  # shrunk to fit 64 patches
rows = moonvit.encode(tower, projector, pv, [g])[0]
w_tower = {k: v.double().numpy() for k, v in tower.state_dict().items()}
w_proj = {k: v.double().numpy() for k, v in projector.state_dict().items()}
want = omoonvit.encode(pv.double().numpy(), w_tower, w_proj, tiny, [g])[0]
print(f"grid {g} -> rows {tuple(rows.shape)}; max |torch − oracle| = {np.abs(rows.numpy() - want).max():.2e}")

# %% [markdown]
# ## Splicing into the prompt
#
# The chat template writes `<|media_begin|>image<|media_content|><|media_pad|><|media_end|>`: one
# placeholder per image. `moonvit.splice` cuts the text embeddings there and inserts the image's rows;
# positions simply count the longer sequence.

# %%
show(moonvit.splice)

# %%
d = tiny.text_hidden_size
pad_id = 99
ids = torch.tensor([[5, 6, pad_id, 7]])
text = torch.zeros(1, 4, d)
spliced = moonvit.splice(text, ids, [rows], pad_id)
print("ids after:", spliced.input_ids[0].tolist())
print("positions:", spliced.positions[0].tolist())

# %% [markdown]
# ## Video: frames, chunks, timestamps
#
# A clip is sampled at min(2 fps, its own fps), and the kept frames are cut into chunks of 4. Each chunk
# is encoded like one image with t ≤ 4 frames (a sin-cos time embedding tells them apart; sd2_tpool then
# averages over time), and gets its own prompt: its first frame's `HH:MM:SS.mmm` and one `<|media_pad|>`.
# Here: 5 seconds of a ball crossing the screen at 6 fps, as a list of frames (a folder of images or an
# animated GIF work the same way; mp4 needs the optional PyAV).

# %%
show(preprocessing.split_video_chunks)


# %%
def ball_frame(i: int, n: int) -> Image.Image:
    img = Image.new("RGB", (112, 56), (20, 20, 40))
    x = 8 + (112 - 24) * i / (n - 1)
    ImageDraw.Draw(img).ellipse([x, 20, x + 16, 36], fill=(240, 120, 40))
    return img


n_frames, fps = 30, 6.0
video = preprocessing.preprocess_video([ball_frame(i, n_frames) for i in range(n_frames)], fps=fps)
for c, g in zip(video.chunks, video.grid_thws):
    print(f"chunk frames {c.frame_indices} grid {g} -> {c.prompt[:12]}")

fig, ax = plt.subplots(figsize=(9, 2.6))
ax.scatter(np.arange(n_frames) / fps, np.zeros(n_frames), marker="|", s=200, color="lightgray", label="all frames")
for k, c in enumerate(video.chunks):
    times = np.array(c.frame_indices) / fps
    ax.scatter(times, np.zeros_like(times), s=80, color=f"C{k}", zorder=3)
    ax.axvspan(times[0] - 0.08, times[-1] + 0.08, color=f"C{k}", alpha=0.15)
    ax.annotate(c.prompt[:12], (times[0], 0.02), rotation=30, fontsize=8)
ax.set_yticks([]); ax.set_ylim(-0.05, 0.12); ax.set_xlabel("seconds")
ax.set_title(f"{n_frames} frames at {fps:g} fps -> {len(video.chunks)} chunks of ≤ 4 sampled frames")
plt.show()

# %% [markdown]
# ## Exercises
#
# 1. Write `tokens_for(width, height, cfg)` by arithmetic alone (no pixels) and check it against
#    `kimi_ref.media.tokens_per_image` for sizes from 1×1 to 20000×20000.
# 2. Write `largest_unresized_square(cfg)`: the biggest square picture (in pixels) that is not resized.
#    Why is it not a multiple of 14?
# 3. Write `video_tokens(num_frames, fps, width, height, cfg)`: how many LLM rows does a whole clip cost?
#    How long a 1080p video fits in a 262,144-token context?
# 4. Write `unpatchify(pixel_values, grid_thw)`: the patches of one image back to its padded picture.
#
# Solutions: [chapters/solutions/11_moonvit.py](solutions/11_moonvit.py) (tested in `tests/test_moonvit.py`).
