"""The probe's measurements of one checkpoint, on points drawn once and stored.

``ProbeSet`` holds every random draw: the levels ``u`` (one in each of ``points`` equal strata
of [0, 1], as ``training.held_out`` draws a run's), one noise tensor per point, and the
starting noise of every sample (prompt x seed). Each checkpoint is scored on the same points and
sampled from the same noise, so two checkpoints' figures differ by their weights alone and a
rerun repeats them.

What one checkpoint gives (the guide's tags, so diagnose, report and watch read them as a
run's):

- ``validation/loss_t0..t9``, ``validation/loss`` (the model's own objective, unweighted),
  ``validation/eps_mse`` and ``validation/cos_eps_mean``: on the held-out images when there are
  some, with ``validation/train_loss`` on the training images at the same points; on the
  training images otherwise;
- ``latent/z_std`` of the scaled training latents (scenario B), ``latent/scale_factor``, and
  ``latent/data_max_abs``;
- ``sample_diversity/*`` over all samples and within each prompt (its seeds),
  ``final_latent_stats/*``, and the copy check against the training images as the VAE renders
  them (``sample_diversity/copy_share``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldmkit.data.sources import to_signed, to_uint8
from ldmkit.probe.pipelines import Family, Text
from ldmkit.vitals import metrics as vm


@dataclass
class ProbeSet:
    """Every random draw of a probe (stored in ``PROBE/probe.safetensors``)."""

    u: torch.Tensor  # [P] levels, stratified
    eps: torch.Tensor  # [P, C, h, w]
    starts: torch.Tensor  # [S, C, h, w] each sample's starting noise
    sample_prompts: torch.Tensor  # [S] the prompt of each sample (index into the prompts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).contiguous() for f in dataclasses.fields(self)}

    def matches(self, other: ProbeSet) -> bool:
        return all(getattr(self, name).shape == getattr(other, name).shape
                   and getattr(self, name).dtype == getattr(other, name).dtype
                   and torch.equal(getattr(self, name), getattr(other, name))
                   for name in self.tensors())


def draw(points: int, prompts: int, seeds: int, latent_shape: tuple[int, ...], seed: int
         ) -> ProbeSet:
    """The draws, from ``seed`` alone. Sample ``s * prompts + p`` is seed ``s`` of prompt ``p``
    (a grid row per seed, a column per prompt)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 11)
    u = (torch.arange(points, dtype=torch.float64)
         + torch.rand(points, generator=gen, dtype=torch.float64)) / points
    eps = torch.randn((points, *latent_shape), generator=gen)
    starts = torch.randn((prompts * seeds, *latent_shape), generator=gen)
    return ProbeSet(u.float(), eps, starts, torch.arange(prompts).repeat(seeds))


@dataclass(frozen=True)
class Images:
    """A set of captioned images and their scaled latents (posterior means)."""

    latents: torch.Tensor  # [N, C, h, w]
    captions: list[str]

    def at(self, points: int) -> torch.Tensor:
        """The image of each point: point k scores image ``k % N``."""
        return torch.arange(points) % len(self.latents)


def encode_images(family: Family, pixels: torch.Tensor, captions: list[str], batch: int
                  ) -> Images:
    """uint8 ``[N, 3, H, W]`` -> their latents through the base's VAE."""
    latents = torch.cat([family.encode_images(to_signed(chunk)).cpu()
                         for chunk in pixels.split(batch)])
    return Images(latents, captions)


def latent_vitals(family: Family, train: Images) -> dict[str, float]:
    """Scenario B's signs for the training data through this VAE and scale."""
    scale, _ = family.vae_factors()
    decoder = family.decoder_latents(train.latents)
    return {vm.Z_STD: vm.latent_std(train.latents).item(), vm.SCALE_FACTOR: scale,
            vm.DATA_EXTREME: decoder.abs().max().item()}


def _texts(family: Family, captions: list[str]) -> tuple[Text, torch.Tensor]:
    """Each distinct caption encoded once, and the row of each caption."""
    distinct = sorted(set(captions))
    row_of = {caption: row for row, caption in enumerate(distinct)}
    rows = torch.tensor([row_of[c] for c in captions])
    encoded: list[Text] = [family.encode(distinct[i:i + 16]) for i in range(0, len(distinct), 16)]
    return {key: torch.cat([e[key] for e in encoded]) if key != "text_ids" else encoded[0][key]
            for key in encoded[0]}, rows


def _rows(text: Text, rows: torch.Tensor) -> Text:
    return {key: value if key == "text_ids" else value[rows.to(value.device)]
            for key, value in text.items()}


@torch.no_grad()
def score(family: Family, images: Images, pset: ProbeSet, batch: int, guidance: float,
          tick: Callable[[int], None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per point ``[P]``: the objective's loss, the eps-MSE, the cosine of predicted and true
    noise; each point's image with its own caption."""
    text, caption_rows = _texts(family, images.captions)
    image_of = images.at(len(pset.u))
    device = family.denoiser.device
    losses, mses, cosines = [], [], []
    for rows in torch.arange(len(pset.u)).split(batch):
        z0 = images.latents[image_of[rows]].to(device)
        noised = family.path.noise(z0, pset.u[rows].to(device), pset.eps[rows].to(device))
        out = family(noised.z_t, noised.timestep, _rows(text, caption_rows[image_of[rows]]),
                     guidance).float()
        eps_pred = family.path.eps_of(out, noised)
        eps = pset.eps[rows].to(device)
        losses.append((out - noised.target.float()).pow(2).flatten(1).mean(1).double().cpu())
        mses.append((eps_pred - eps).pow(2).flatten(1).mean(1).double().cpu())
        cosines.append(vm.cos_eps(eps_pred, eps).double().cpu())
        tick(len(rows))
    return torch.cat(losses), torch.cat(mses), torch.cat(cosines)


def validation_vitals(family: Family, train: Images, holdout: Images | None, pset: ProbeSet,
                      batch: int, guidance: float, tick: Callable[[int], None]
                      ) -> dict[str, float]:
    """The ten buckets and the means on the held-out images (else the training images), and
    the training images' loss at the same points when there are held-out ones."""
    judged = holdout or train
    loss, mse, cos = score(family, judged, pset, batch, guidance, tick)
    bucket = (pset.u * vm.VAL_BUCKETS).long().clamp(max=vm.VAL_BUCKETS - 1)
    values = {vm.VAL_LOSS: loss.mean().item(), vm.VAL_PREFIX + "eps_mse": mse.mean().item(),
              vm.VAL_PREFIX + "cos_eps_mean": cos.mean().item()}
    for k in range(vm.VAL_BUCKETS):
        values[vm.val_bucket_tag(k)] = loss[bucket == k].mean().item()
    if holdout is not None:
        values[vm.VAL_TRAIN_LOSS] = score(family, train, pset, batch, guidance,
                                          tick)[0].mean().item()
    return values


def copy_reference(family: Family, train: Images, batch: int) -> vm.CopyReference | None:
    """The training images (the probe's sample of them) as the base's VAE renders them."""
    return vm.CopyReference.of(lambda z: torch.cat([family.decode(c) for c in z.split(batch)]),
                               train.latents, torch.arange(len(train.latents)))


@torch.no_grad()
def sample_vitals(family: Family, prompts: list[str], pset: ProbeSet, steps: int,
                  guidance: float, batch: int, reference: vm.CopyReference | None,
                  tick: Callable[[int], None]) -> tuple[dict[str, float], torch.Tensor]:
    """The samples' signs and the images ``uint8 [S, 3, H, W]`` (row per seed)."""
    latents = []
    for rows in torch.arange(len(pset.starts)).split(batch):
        asked = [prompts[i] for i in pset.sample_prompts[rows].tolist()]
        latents.append(family.sample(asked, pset.starts[rows], steps, guidance).cpu())
        tick(len(rows))
    z = torch.cat(latents)
    images = torch.cat([family.decode(chunk) for chunk in z.split(batch)])
    values = vm.sample_vitals(family.decoder_latents(z), pset.sample_prompts, by="prompt")
    if reference is not None:
        values |= vm.copy_vitals(images, reference)
    return values, to_uint8(images)
