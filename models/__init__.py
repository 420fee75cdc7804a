"""Model zoo: MobileNetV1/V2/V3 and ShuffleNetV2, baselines and BFT, in timm's registry."""
