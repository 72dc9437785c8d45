"""Model bundles (card + weights), the ResNet50 architecture, and class-activation maps."""
