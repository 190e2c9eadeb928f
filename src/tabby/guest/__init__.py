"""What a VM image needs for tabby's IPv6: render it into an image, and check a running guest."""
