"""Floor 3, the model: the backbone registry, preprocessing layers, freezing and compiling (`network`), where
ImageNet weights come from and how they load (`weights`, `pretrained`), and Grad-CAM on the nested backbone
(`gradcam`).
"""
