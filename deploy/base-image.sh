#!/bin/sh
# A python3 base image made from Debian's packages, for building deploy/Containerfile
# where Docker Hub (python:3.11-slim) cannot be reached:
#
#   sh deploy/base-image.sh            # -> localhost/messagevault-base:bookworm
#   podman build --build-arg BASE_IMAGE=localhost/messagevault-base:bookworm \
#       -f deploy/Containerfile -t messagevault .
#
# Needs root, debootstrap and podman; does nothing if the image exists.
set -eu
image=${1:-localhost/messagevault-base:bookworm}
if podman image exists "$image"; then
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$work/rootfs" http://deb.debian.org/debian
tar -C "$work/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$image"
