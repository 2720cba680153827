"""Model families. One file per family; each is a plain `nn.Module`."""
