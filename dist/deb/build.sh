#!/bin/sh
# Build target/debian/vmbalance_<version>_<arch>.deb with dpkg-deb from what `make install` puts
# in place (PREFIX=/usr): the binaries (stripped), man pages (gzipped), the operator's documentation
# (gzipped past 4 KiB, as Debian policy 12.3 asks), units, configuration files (conffiles), the
# dashboard and the Prometheus rules, the copyright, a changelog and md5sums. Depends are worked
# out by dpkg-shlibdeps from the binaries' own links (libvirt0, libc6, ...): no compiler needed.
# The maintainer is DEBFULLNAME <DEBEMAIL>, as for Debian's own tools; unset, an address under the
# reserved .invalid domain says that nobody signed this build.
set -eu
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
out=target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage"
make --no-print-directory install DESTDIR="$PWD/$stage" PREFIX=/usr SYSCONFDIR=/etc
# As dh_strip does: no symbols, no .comment or .note sections.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage"/usr/bin/*
gzip -9n "$stage"/usr/share/man/man1/*.1
doc=$stage/usr/share/doc/vmbalance
find "$doc" -type f -size +4k -exec gzip -9n {} +
install -m 644 dist/deb/copyright "$doc/copyright"
maintainer="${DEBFULLNAME:-The vmbalance authors} <${DEBEMAIL:-maintainers@vmbalance.invalid}>"
# A native package (its version has no Debian revision): its changelog is changelog.gz.
printf 'vmbalance (%s) unstable; urgency=medium\n\n  * Built from the vmbalance repository.\n\n -- %s  %s\n' \
	"$version" "$maintainer" "$(date -R -d @"${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}")" \
	| gzip -9n > "$doc/changelog.gz"

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
	-e "s|@MAINTAINER@|$maintainer|" dist/deb/control.in > "$stage/DEBIAN/control"
(cd "$stage" && find etc -type f | sed 's|^|/|' | sort) > "$stage/DEBIAN/conffiles"
(cd "$stage" && find . -path ./DEBIAN -prune -o -path ./etc -prune -o -type f -printf '%P\n' | LC_ALL=C sort | xargs md5sum) \
	> "$stage/DEBIAN/md5sums"
for script in postinst prerm postrm; do
	install -m 755 "dist/deb/$script" "$stage/DEBIAN/$script"
done
deb=$out/vmbalance_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
rm -rf "$stage"
echo "built: $deb"
