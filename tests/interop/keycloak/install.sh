#!/usr/bin/env bash
# Fetch and build the pinned Keycloak server once into the interop cache (make keycloak).
#   install.sh CACHE_DIR VERSION
# The zip comes from Maven Central through mvn (org.keycloak:keycloak-quarkus-dist); the build
# step fixes the features and database once, so each test run starts it with --optimized.
# A JDK >= 21 is needed (Keycloak 26.x); the JDK home used is recorded in .java-home.
set -euo pipefail
cache="$1"
version="$2"
home="$cache/keycloak-$version"
stamp="$home/.sidecar-built"
mkdir -p "$cache"
exec 9>"$cache/.keycloak.lock"
flock 9 # parallel make runs share the cache: one installs, the others wait
[ -f "$stamp" ] && exit 0

java_major() { "$1/bin/java" -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/ {print $2}'; }
find_java() {
  local candidate
  for candidate in "${JAVA_HOME:-}" /usr/lib/jvm/*; do
    [ -n "$candidate" ] && [ -x "$candidate/bin/java" ] || continue
    if [ "$(java_major "$candidate")" -ge 21 ] 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
if ! java_home="$(find_java)"; then
  # Debian names its JDKs by version; bookworm stops at 17, later releases have 21.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q openjdk-21-jre-headless >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q openjdk-21-jre-headless >/dev/null 2>&1; } || true
  fi
  java_home="$(find_java)" || { echo "Keycloak $version needs a JDK >= 21 (set JAVA_HOME)" >&2; exit 1; }
fi

zip="$cache/keycloak-quarkus-dist-$version.zip"
if [ ! -f "$zip" ]; then
  echo "fetching Keycloak $version (about 170 MB) ..."
  mvn -q -B dependency:copy "-Dartifact=org.keycloak:keycloak-quarkus-dist:$version:zip" \
    "-DoutputDirectory=$cache.tmp-$$"
  mv "$cache.tmp-$$/keycloak-quarkus-dist-$version.zip" "$zip"
  rmdir "$cache.tmp-$$"
fi
rm -rf "$home" "$home.tmp"
mkdir "$home.tmp"
unzip -q "$zip" -d "$home.tmp"
mv "$home.tmp/keycloak-$version" "$home"
rmdir "$home.tmp"
echo "building Keycloak $version (features: spiffe; in-memory H2) with $java_home ..."
# spiffe: the SPIFFE identity provider is still a preview feature (its draft is not an RFC);
# federated-jwt client auth, DPoP and the JWT authorization grant are supported by default.
JAVA_HOME="$java_home" "$home/bin/kc.sh" build --features=spiffe --db=dev-mem >"$home/build.log" 2>&1 ||
  { tail -20 "$home/build.log" >&2; exit 1; }
echo "$java_home" >"$home/.java-home"
touch "$stamp"
