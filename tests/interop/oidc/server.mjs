// oidc-provider (https://github.com/panva/node-oidc-provider, an OpenID-certified server) on
// loopback, configured the way a platform team would run it for workloads:
//
//   * HTTPS that asks for (but does not demand) client certificates from the SPIFFE trust bundle;
//   * RFC 8705 tls_client_auth, the client matched by tls_client_auth_san_uri = its SPIFFE ID;
//   * RFC 9449 DPoP with server nonces required on the token endpoint;
//   * RFC 8707 resource indicators issuing RFC 9068 JWT access tokens (ES256);
//   * an RFC 8693 token-exchange grant whose subject token is a JWT-SVID checked against the
//     trust domain's JWT bundle.
//
// Usage: node server.mjs <config.json>. The config is written by tests/interop/oidc_provider.py.
// The server prints one JSON line ({"issuer": ...}) on stdout when it is ready, logs every token
// request outcome as a JSON line on stdout, and exits when stdin closes (its parent went away).

import { X509Certificate, randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';

import { createLocalJWKSet, jwtVerify } from 'jose';
import Provider, { errors } from 'oidc-provider';
// Deep import (the package has no export map): the helpers the built-in grants use, so the
// custom grant validates DPoP proofs and resources exactly as client_credentials does.
import * as grantHelpers from 'oidc-provider/lib/helpers/grants.js';

const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const JWT_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:jwt';
const ACCESS_TOKEN_TYPE = 'urn:ietf:params:oauth:token-type:access_token';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const emit = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

// jose only considers keys meant for signatures; SPIFFE bundles mark JWT keys use=jwt-svid.
const spiffeKeys = createLocalJWKSet({
  keys: config.spiffe_jwks.keys.map(({ use, ...key }) => key),
});

const server = createServer({
  cert: config.tls.cert,
  key: config.tls.key,
  ca: config.tls.client_ca,
  requestCert: true,
  rejectUnauthorized: false, // clients that authenticate otherwise connect without a certificate
});
await new Promise((resolve) => { server.listen(0, '127.0.0.1', resolve); });
const issuer = `https://127.0.0.1:${server.address().port}`;

function peerCertificate(ctx) {
  const cert = ctx.socket.getPeerX509Certificate?.();
  return cert instanceof X509Certificate ? cert : undefined;
}

const subjects = new WeakMap(); // request context -> SPIFFE ID of the exchanged subject token

const provider = new Provider(issuer, {
  clients: config.clients,
  jwks: config.signing_jwks,
  scopes: config.scopes,
  clientAuthMethods: ['tls_client_auth', 'none'],
  clientDefaults: {
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    id_token_signed_response_alg: 'ES256',
  },
  enabledJWA: {
    clientAuthSigningAlgValues: ['ES256'],
    dPoPSigningAlgValues: ['ES256', 'EdDSA', 'PS256', 'RS256'],
    idTokenSigningAlgValues: ['ES256'],
  },
  features: {
    devInteractions: { enabled: false },
    introspection: { enabled: true },
    clientCredentials: { enabled: true },
    dPoP: {
      enabled: true,
      nonceSecret: randomBytes(32),
      requireNonce: () => config.dpop_require_nonce,
    },
    mTLS: {
      enabled: true,
      tlsClientAuth: true,
      getCertificate(ctx) {
        return peerCertificate(ctx)?.toString();
      },
      certificateAuthorized(ctx) {
        return ctx.socket.authorized === true;
      },
      certificateSubjectMatches(ctx, property, expected) {
        const cert = peerCertificate(ctx);
        if (!cert || property !== 'tls_client_auth_san_uri') return false;
        const uris = (cert.subjectAltName ?? '')
          .split(', ')
          .filter((name) => name.startsWith('URI:'))
          .map((name) => name.slice(4));
        return uris.includes(expected);
      },
    },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => undefined,
      useGrantedResource: () => false,
      getResourceServerInfo(ctx, resource) {
        const server = config.resources[resource];
        if (!server) throw new errors.InvalidTarget(`unknown resource ${resource}`);
        return {
          scope: server.scopes.join(' '),
          audience: resource,
          accessTokenTTL: server.ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'ES256' } },
        };
      },
    },
  },
  async extraTokenClaims(ctx) {
    const subject = ctx && subjects.get(ctx);
    return subject ? { act: { sub: ctx.oidc.client.clientId }, spiffe_id: subject } : undefined;
  },
});

// RFC 8693 token exchange: the workload presents its JWT-SVID as the subject token.
const helpers = Object.fromEntries(
  Object.entries(grantHelpers).map(([name, helper]) => [name, helper.bind(undefined, provider)]),
);
provider.registerGrantType(
  TOKEN_EXCHANGE,
  async (ctx) => {
    const { params, client } = ctx.oidc;
    if (params.subject_token_type !== JWT_TOKEN_TYPE) {
      throw new errors.InvalidRequest(`subject_token_type must be ${JWT_TOKEN_TYPE}`);
    }
    if (params.requested_token_type && params.requested_token_type !== ACCESS_TOKEN_TYPE) {
      throw new errors.InvalidRequest('only access tokens can be requested');
    }
    let subject;
    try {
      const { payload } = await jwtVerify(params.subject_token, spiffeKeys, {
        audience: issuer,
        algorithms: ['ES256'],
        requiredClaims: ['sub', 'exp'],
      });
      subject = payload.sub;
    } catch (err) {
      throw new errors.InvalidGrant(`subject token rejected: ${err.code ?? err.message}`);
    }
    if (!subject.startsWith(`spiffe://${config.trust_domain}/`)) {
      throw new errors.InvalidGrant('subject is not in the trusted SPIFFE trust domain');
    }
    subjects.set(ctx, subject);

    const dPoP = await helpers.validateDpop(ctx);
    const resources = await helpers.resolveRequestedResources(ctx);
    if (resources.length !== 1) {
      throw new errors.InvalidTarget('exactly one resource indicator is required');
    }
    const [resourceServer] = resources;
    const offered = new Set(resourceServer.scope.split(' '));
    const requested = [...helpers.validateClientScope(ctx)];
    const token = new provider.ClientCredentials({
      client,
      scope: requested.filter((s) => offered.has(s)).join(' ') || undefined,
    });
    token.resourceServer = resourceServer;
    if (dPoP) {
      await grantHelpers.checkDpopReplay(provider, ctx, dPoP, client.clientId);
      token.setThumbprint('jkt', dPoP.thumbprint);
    }
    helpers.checkDpopRequired(ctx, dPoP);
    ctx.oidc.entity('ClientCredentials', token);
    const value = await token.save();
    ctx.body = {
      ...helpers.buildTokenResponse({
        accessToken: value,
        expiresIn: token.expiration,
        scope: token.scope || undefined,
        tokenType: token.tokenType,
      }),
      issued_token_type: ACCESS_TOKEN_TYPE,
    };
  },
  ['subject_token', 'subject_token_type', 'requested_token_type', 'actor_token',
    'actor_token_type', 'audience', 'resource', 'scope'],
  ['resource', 'audience'],
);

provider.on('grant.success', (ctx) => {
  emit({ event: 'token', grant_type: ctx.oidc.params.grant_type, client_id: ctx.oidc.client.clientId });
});
provider.on('grant.error', (ctx, err) => {
  emit({ event: 'token_error', error: err.error, description: err.error_description });
});
provider.on('server_error', (ctx, err) => {
  emit({ event: 'server_error', description: String(err?.stack ?? err) });
});

server.on('request', provider.callback());
emit({ event: 'ready', issuer });

process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
process.on('SIGTERM', () => process.exit(0));
