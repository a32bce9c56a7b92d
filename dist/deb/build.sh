#!/bin/sh
# Build target/debian/vmbalance_<version>_<arch>.deb with dpkg-deb from what `make install` puts
# in place (PREFIX=/usr): the binaries (stripped), man pages (gzipped), units, configuration files
# (conffiles), the dashboard and the Prometheus rules, the copyright. Depends are worked out by
# dpkg-shlibdeps from the binaries' own links (libvirt0, libc6, ...): no compiler needed.
set -eu
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
out=target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage"
make --no-print-directory install DESTDIR="$PWD/$stage" PREFIX=/usr SYSCONFDIR=/etc
strip --strip-unneeded "$stage"/usr/bin/*
gzip -9n "$stage"/usr/share/man/man1/*.1
doc=$stage/usr/share/doc/vmbalance
mkdir -p "$doc"
install -m 644 dist/deb/copyright "$doc/copyright"
printf 'vmbalance (%s) unstable; urgency=medium\n\n  * Built from the vmbalance repository.\n\n -- The vmbalance authors <vmbalance@localhost>  %s\n' \
	"$version" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
	| gzip -9n > "$doc/changelog.Debian.gz"

# dpkg-shlibdeps reads debian/control: give it one of its own.
shlibs=$(mktemp -d)
mkdir "$shlibs/debian"
printf 'Source: vmbalance\n\nPackage: vmbalance\nArchitecture: any\n' > "$shlibs/debian/control"
depends=$(cd "$shlibs" && dpkg-shlibdeps -O $(for b in "$OLDPWD/$stage"/usr/bin/*; do printf -- '-e%s ' "$b"; done) 2>/dev/null \
	| sed -n 's/^shlibs:Depends=//p')
rm -rf "$shlibs"
case "$depends" in
*libvirt0*) ;;
*) echo "build.sh: dpkg-shlibdeps found no libvirt0 dependency ($depends)" >&2; exit 1 ;;
esac

mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" -e "s/@DEPENDS@/$depends/" \
	dist/deb/control.in > "$stage/DEBIAN/control"
(cd "$stage" && find etc -type f | sed 's|^|/|' | sort) > "$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
	install -m 755 "dist/deb/$script" "$stage/DEBIAN/$script"
done
deb=$out/vmbalance_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
rm -rf "$stage"
echo "built: $deb"
