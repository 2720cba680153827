"""Request inputs: images, chat templates, placeholder expansion."""
